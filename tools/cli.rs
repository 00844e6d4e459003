//! Shared by the tools: errors go to stderr as one line chain, with exit code 1
//! (no backtrace dump even where RUST_BACKTRACE is set).

pub fn exit(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Which list of a data folder to read (`--split`).
#[allow(dead_code)]
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum SplitArg {
    Auto,
    Train,
    Test,
}

#[allow(dead_code)]
impl SplitArg {
    pub fn split(self) -> sam_unet::data::prepare::Split {
        use sam_unet::data::prepare::Split;
        match self {
            SplitArg::Auto => Split::Auto,
            SplitArg::Train => Split::Train,
            SplitArg::Test => Split::Test,
        }
    }
}

/// Weights from a file (safetensors or .pth), or `random:ARCH[:SEED]`.
#[allow(dead_code)]
pub fn load_weights(spec: &str) -> anyhow::Result<sam_unet::io::Weights> {
    use anyhow::Context;
    if let Some(s) = spec.strip_prefix("random:") {
        let (arch, seed) = match s.rsplit_once(':') {
            Some((a, n)) => (
                a,
                n.parse::<u64>()
                    .with_context(|| format!("seed `{n}` in {spec}"))?,
            ),
            None => (s, 0),
        };
        return Ok(sam_unet::model::SamUnetConfig::named(arch)?.random_weights(seed));
    }
    sam_unet::io::Weights::from_file(spec).with_context(|| format!("reading the weights {spec}"))
}

/// Refuses an output path that is one of the inputs (the same file or folder
/// by another path too: links, `..`; hard links are not seen), so that a
/// mistyped command loses nothing.
#[allow(dead_code)]
pub fn not_an_input(
    out_flag: &str,
    out: &std::path::Path,
    inputs: &[(&str, &std::path::Path)],
) -> anyhow::Result<()> {
    // An output that does not exist yet replaces nothing.
    let Ok(o) = out.canonicalize() else {
        return Ok(());
    };
    for (flag, input) in inputs {
        if input.canonicalize().is_ok_and(|i| i == o) {
            anyhow::bail!(
                "{out_flag} {} is the {flag} input: refusing to overwrite it",
                out.display()
            );
        }
    }
    Ok(())
}

/// Refuses an output file name that does not end in one of `endings`
/// (e.g. ".nii.gz"; case ignored): a typo in the name must not write a
/// format the user did not ask for, or replace an unrelated file.
#[allow(dead_code)]
pub fn output_ending(flag: &str, path: &std::path::Path, endings: &[&str]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if !endings
        .iter()
        .any(|e| name.ends_with(e) && name.len() > e.len())
    {
        anyhow::bail!(
            "{flag} {}: the file name must end in {}",
            path.display(),
            endings.join(" or ")
        );
    }
    Ok(())
}
