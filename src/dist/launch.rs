//! Where a rank learns who it is: the environment that torchrun (and
//! `torch.distributed.launch`, and our own `train --nproc`) sets, or
//! Slurm's.

use crate::error::{Error, Result};

/// This process's place in a multi-process job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// The rank on its machine: the GPU it takes.
    pub local_rank: usize,
    /// host:port of rank 0's rendezvous.
    pub master: String,
    /// Which environment it came from ("torchrun" or "slurm").
    pub source: &'static str,
}

const DEFAULT_PORT: &str = "29500";

impl Launch {
    /// From this process's environment; None when neither torchrun's nor
    /// Slurm's variables are set (a single process).
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(&|k| std::env::var(k).ok())
    }

    /// From variables given by `get` (the environment, or a test's).
    /// torchrun's WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
    /// come first (under torchrun itself, TORCHELASTIC_RUN_ID set, rank 0
    /// listens on MASTER_PORT + 1: the agent's store holds MASTER_PORT); else Slurm's SLURM_NTASKS / SLURM_PROCID / SLURM_LOCALID,
    /// rank 0 on the first host of SLURM_JOB_NODELIST (MASTER_ADDR and
    /// MASTER_PORT still override it).
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let num = |k: &str| -> Result<Option<usize>> {
            get(k)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| Error::input("launch", format!("{k}={v:?} is not a number")))
                })
                .transpose()
        };
        let need = |k: &str| -> Result<usize> {
            num(k)?.ok_or_else(|| Error::input("launch", format!("{k} is not set")))
        };
        let mut port = get("MASTER_PORT").unwrap_or_else(|| DEFAULT_PORT.into());
        // Under torchrun itself, its agent's TCP store holds MASTER_PORT:
        // rank 0 listens on the next port.
        if get("TORCHELASTIC_RUN_ID").is_some() {
            let p: u16 = port.trim().parse().map_err(|_| {
                Error::input("launch", format!("MASTER_PORT={port:?} is not a port"))
            })?;
            port = p
                .checked_add(1)
                .ok_or_else(|| {
                    Error::input(
                        "launch",
                        "MASTER_PORT is the last port: torchrun's store holds it",
                    )
                })?
                .to_string();
        }
        let (rank, world, local_rank, host, source) = if let Some(world) = num("WORLD_SIZE")? {
            let rank = need("RANK")?;
            let local = num("LOCAL_RANK")?.unwrap_or(0);
            let host = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
            (rank, world, local, host, "torchrun")
        } else if let Some(world) = num("SLURM_NTASKS")? {
            let rank = need("SLURM_PROCID")?;
            let local = num("SLURM_LOCALID")?.unwrap_or(0);
            let host = match get("MASTER_ADDR") {
                Some(h) => h,
                None => {
                    let list = get("SLURM_JOB_NODELIST")
                        .or_else(|| get("SLURM_NODELIST"))
                        .ok_or_else(|| {
                            Error::input(
                                "launch",
                                "SLURM_NTASKS is set but neither MASTER_ADDR nor SLURM_JOB_NODELIST",
                            )
                        })?;
                    first_host(&list)?
                }
            };
            (rank, world, local, host, "slurm")
        } else {
            return Ok(None);
        };
        if world == 0 || rank >= world {
            return Err(Error::input(
                "launch",
                format!("rank {rank} of a world of {world} ({source} environment)"),
            ));
        }
        Ok(Some(Launch {
            rank,
            world,
            local_rank,
            master: format!("{host}:{port}"),
            source,
        }))
    }
}

/// The first host of a Slurm node list: `gpu[07-09,12],cpu01` -> `gpu07`.
pub fn first_host(list: &str) -> Result<String> {
    let bad = || {
        Error::input(
            "launch",
            format!("cannot read the Slurm node list {list:?}"),
        )
    };
    let list = list.trim();
    // The first entry: up to a comma outside brackets.
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    // Each bracketed range by its first value.
    let mut host = list[..end].to_string();
    while let Some(open) = host.find('[') {
        let close = host[open..].find(']').ok_or_else(bad)? + open;
        let lo = host[open + 1..close]
            .split([',', '-'])
            .next()
            .unwrap_or_default()
            .to_string();
        host.replace_range(open..=close, &lo);
    }
    if host.is_empty() {
        return Err(bad());
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(kv: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn reads_torchrun_and_slurm() {
        assert_eq!(Launch::from_vars(&vars(&[])).unwrap(), None);
        let t = Launch::from_vars(&vars(&[
            ("WORLD_SIZE", "8"),
            ("RANK", "5"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node3"),
            ("MASTER_PORT", "29611"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (t.rank, t.world, t.local_rank, t.master.as_str()),
            (5, 8, 1, "node3:29611")
        );
        // Started by torchrun: the next port.
        let e = Launch::from_vars(&vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_RUN_ID", "job"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(e.master, "127.0.0.1:29501");
        let s = Launch::from_vars(&vars(&[
            ("SLURM_NTASKS", "16"),
            ("SLURM_PROCID", "9"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[07-09,12],cpu01"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (s.rank, s.world, s.local_rank, s.master.as_str()),
            (9, 16, 1, "gpu07:29500")
        );
        assert_eq!(s.source, "slurm");
        for bad in [
            vec![("WORLD_SIZE", "2")],
            vec![("WORLD_SIZE", "2"), ("RANK", "2")],
            vec![("WORLD_SIZE", "two"), ("RANK", "0")],
            vec![("SLURM_NTASKS", "2"), ("SLURM_PROCID", "0")],
        ] {
            assert!(Launch::from_vars(&vars(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn first_host_of_node_lists() {
        assert_eq!(first_host("node17").unwrap(), "node17");
        assert_eq!(first_host("a01,a02").unwrap(), "a01");
        assert_eq!(first_host("gpu[3,5-6]").unwrap(), "gpu3");
        assert_eq!(first_host("rack[1-2]-n[1-4]").unwrap(), "rack1-n1");
        assert!(first_host("").is_err());
        assert!(first_host("gpu[1-2").is_err());
    }
}
