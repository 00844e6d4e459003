//! `tools/eval`: the authors' test protocol over a data folder (EVAL.md),
//! one row per mask, and the reports built from the rows.
//!
//! Per image: every mask read (strictly: binary, the image's size), its box
//! from the largest 8-connected component at the original resolution (max
//! exclusive, no jitter); images batched through the image side, all masks
//! of an image through one decoder call; the prediction at the original
//! resolution (low-res logits -> 256 -> crop -> H x W -> logit > 0) against
//! the mask. Rows carry the grouping SA-Med2D names give (`unknown`
//! otherwise), the box, the areas, TP / FP / FN, Dice and IoU as the authors
//! compute them, NSD at a tolerance and HD95 (DeepMind's algorithm, pixel
//! spacing 1 for 2-D images).
//!
//! `--shard K/N` takes every N-th image from the K-th: shards' rows merged
//! give the same reports as one run (the rows are sorted before reporting).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use crate::data::names::{UNKNOWN, image_group, mask_class};
use crate::data::prepare::{Item, read_mask_strict};
use crate::error::{Error, Result};
use crate::eval::metrics::{overlap, surface_distances_2d};
use crate::io::image::read_rgb;
use crate::io::write_atomic as write;
use crate::predictor::Predictor;
use crate::preprocess::box_from_mask;

/// One evaluated mask.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub image: String,
    pub mask: String,
    pub modality: String,
    pub dataset: String,
    pub case: String,
    /// From `--{class:04d}_{instance:03d}`; None for other names.
    pub class: Option<u32>,
    pub instance: Option<u32>,
    /// (x0, y0, x1, y1) in original pixels, max exclusive
    pub bbox: [f32; 4],
    pub area_gt: u64,
    pub area_pred: u64,
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
    pub dice: f64,
    pub iou: f64,
    /// NaN when both surfaces are empty (cannot happen: the reference is
    /// never empty here)
    pub nsd: f64,
    /// infinity when the prediction is empty
    pub hd95: f64,
}

/// What `evaluate` was asked.
#[derive(Clone, Copy, Debug)]
pub struct EvalOptions {
    /// NSD tolerance in pixels.
    pub tolerance: f64,
    /// Images per image-side batch.
    pub batch_images: usize,
    /// (k, n): images k, k + n, k + 2n, ... of the listing.
    pub shard: Option<(usize, usize)>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            tolerance: 2.0,
            batch_images: 4,
            shard: None,
        }
    }
}

/// A mask left out, and why (unreadable, empty, not binary, not the
/// image's size; an unreadable image leaves out all its masks).
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Where an evaluation's time went (seconds): reading and checking files,
/// the model (image side and decoder, up to the masks at the original
/// resolution), the metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct EvalTiming {
    pub read_s: f64,
    pub model_s: f64,
    pub metrics_s: f64,
}

/// The rows of `items` (shard applied) and the masks skipped.
pub fn evaluate(
    predictor: &Predictor,
    items: &[Item],
    o: EvalOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<Row>, Vec<Skipped>)> {
    evaluate_timed(predictor, items, o, progress).map(|(r, s, _)| (r, s))
}

/// `evaluate`, with where the time went.
pub fn evaluate_timed(
    predictor: &Predictor,
    items: &[Item],
    o: EvalOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<Row>, Vec<Skipped>, EvalTiming)> {
    use std::time::Instant;
    let mut timing = EvalTiming::default();
    check_tolerance("eval", o.tolerance)?;
    if o.batch_images == 0 {
        return Err(Error::input("eval", "images per batch must be at least 1"));
    }
    if let Some((k, n)) = o.shard
        && (n == 0 || k >= n)
    {
        return Err(Error::input(
            "eval",
            format!("shard {k}/{n}: need 0 <= K < N"),
        ));
    }
    let mine: Vec<&Item> = items
        .iter()
        .enumerate()
        .filter(|(i, _)| o.shard.is_none_or(|(k, n)| i % n == k))
        .map(|(_, it)| it)
        .collect();
    let total_masks: usize = mine.iter().map(|i| i.masks.len()).sum();
    let (mut rows, mut skipped) = (vec![], vec![]);
    let mut done = 0;
    for chunk in mine.chunks(o.batch_images.max(1)) {
        // Read and check everything of the chunk first.
        let t_read = Instant::now();
        let mut images = vec![];
        let mut boxes = vec![];
        let mut metas = vec![];
        for it in chunk {
            let img = match read_rgb(&it.image) {
                Ok(i) => i,
                Err(e) => {
                    for (p, _) in &it.masks {
                        skipped.push(Skipped {
                            path: p.display().to_string(),
                            reason: format!("its image: {}", e.full()),
                        });
                    }
                    done += it.masks.len();
                    continue;
                }
            };
            let mut bs = vec![];
            let mut ms = vec![];
            for (p, name) in &it.masks {
                let m = match read_mask_strict(p) {
                    Ok(m) => m,
                    Err(e) => {
                        skipped.push(Skipped {
                            path: p.display().to_string(),
                            reason: e.full(),
                        });
                        continue;
                    }
                };
                if (m.width, m.height) != (img.width, img.height) {
                    skipped.push(Skipped {
                        path: p.display().to_string(),
                        reason: format!(
                            "mask {} x {}, image {} x {}",
                            m.width, m.height, img.width, img.height
                        ),
                    });
                    continue;
                }
                let Some(b) = box_from_mask(&m) else {
                    skipped.push(Skipped {
                        path: p.display().to_string(),
                        reason: "empty mask".into(),
                    });
                    continue;
                };
                bs.push(b);
                ms.push((name.clone(), m));
            }
            if ms.is_empty() {
                done += it.masks.len();
                continue;
            }
            images.push(img);
            boxes.push(bs);
            metas.push((it, ms));
        }
        timing.read_s += t_read.elapsed().as_secs_f64();
        if images.is_empty() {
            progress(done, total_masks);
            continue;
        }
        let t_model = Instant::now();
        let preds = predictor.predict_batch(&images, &boxes)?;
        timing.model_s += t_model.elapsed().as_secs_f64();
        let t_metrics = Instant::now();
        for ((pred, (it, ms)), bs) in preds.iter().zip(&metas).zip(&boxes) {
            let g = image_group(&it.name);
            for (k, (name, m)) in ms.iter().enumerate() {
                let p: Vec<u8> = pred.masks[k].iter().map(|&b| b as u8).collect();
                let ov = overlap(&p, &m.data);
                let sd = surface_distances_2d(&p, &m.data, m.height, m.width, (1.0, 1.0));
                let (class, instance) =
                    mask_class(name).map_or((None, None), |(c, i)| (Some(c), Some(i)));
                rows.push(Row {
                    image: it.name.clone(),
                    mask: name.clone(),
                    modality: g.modality.clone(),
                    dataset: g.dataset.clone(),
                    case: g.case.clone(),
                    class,
                    instance,
                    bbox: bs[k],
                    area_gt: ov.tp + ov.fn_,
                    area_pred: ov.tp + ov.fp,
                    tp: ov.tp,
                    fp: ov.fp,
                    fn_: ov.fn_,
                    dice: ov.dice,
                    iou: ov.iou,
                    nsd: sd.nsd(o.tolerance),
                    hd95: sd.hausdorff(95.0),
                });
            }
            done += it.masks.len();
        }
        timing.metrics_s += t_metrics.elapsed().as_secs_f64();
        progress(done, total_masks);
    }
    Ok((rows, skipped, timing))
}

/// JSON numbers cannot be NaN or infinite: those are written as strings
/// ("nan", "inf") and read back.
fn num(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else if v.is_nan() {
        json!("nan")
    } else if v > 0.0 {
        json!("inf")
    } else {
        json!("-inf")
    }
}

fn unnum(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| match v.as_str()? {
        "nan" => Some(f64::NAN),
        "inf" => Some(f64::INFINITY),
        "-inf" => Some(f64::NEG_INFINITY),
        _ => None,
    })
}

impl Row {
    pub fn to_json(&self) -> Value {
        json!({
            "image": self.image, "mask": self.mask, "modality": self.modality,
            "dataset": self.dataset, "case": self.case, "class": self.class,
            "instance": self.instance, "box": self.bbox, "area_gt": self.area_gt,
            "area_pred": self.area_pred, "tp": self.tp, "fp": self.fp, "fn": self.fn_,
            "dice": num(self.dice), "iou": num(self.iou), "nsd": num(self.nsd), "hd95": num(self.hd95),
        })
    }

    pub fn from_json(v: &Value) -> Option<Row> {
        let s = |k: &str| v[k].as_str().map(str::to_string);
        let u = |k: &str| v[k].as_u64();
        let b: Vec<f32> = v["box"]
            .as_array()?
            .iter()
            .filter_map(|x| x.as_f64().map(|f| f as f32))
            .collect();
        Some(Row {
            image: s("image")?,
            mask: s("mask")?,
            modality: s("modality")?,
            dataset: s("dataset")?,
            case: s("case")?,
            class: v["class"].as_u64().map(|c| c as u32),
            instance: v["instance"].as_u64().map(|c| c as u32),
            bbox: b.try_into().ok()?,
            area_gt: u("area_gt")?,
            area_pred: u("area_pred")?,
            tp: u("tp")?,
            fp: u("fp")?,
            fn_: u("fn")?,
            dice: unnum(&v["dice"])?,
            iou: unnum(&v["iou"])?,
            nsd: unnum(&v["nsd"])?,
            hd95: unnum(&v["hd95"])?,
        })
    }
}

/// Mean, median and count of the finite values, and how many were not.
fn stats(v: impl Iterator<Item = f64>) -> Value {
    let all: Vec<f64> = v.collect();
    let mut f: Vec<f64> = all.iter().copied().filter(|x| x.is_finite()).collect();
    f.sort_by(f64::total_cmp);
    let n = f.len();
    let mean = if n > 0 {
        f.iter().sum::<f64>() / n as f64
    } else {
        f64::NAN
    };
    let median = if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        f[n / 2]
    } else {
        0.5 * (f[n / 2 - 1] + f[n / 2])
    };
    json!({"mean": num(mean), "median": num(median), "count": n, "not_finite": all.len() - n})
}

fn group_stats(rows: &[&Row]) -> Value {
    json!({
        "masks": rows.len(),
        "empty_predictions": rows.iter().filter(|r| r.area_pred == 0).count(),
        "dice": stats(rows.iter().map(|r| r.dice)),
        "iou": stats(rows.iter().map(|r| r.iou)),
        "nsd": stats(rows.iter().map(|r| r.nsd)),
        "hd95": stats(rows.iter().map(|r| r.hd95)),
    })
}

/// Rows in one order whatever the sharding: by image, then mask.
pub fn sort_rows(rows: &mut [Row]) {
    rows.sort_by(|a, b| (&a.image, &a.mask).cmp(&(&b.image, &b.mask)));
}

/// Writes the reports of `rows` under `out`: rows.jsonl, rows.csv,
/// summary.json (nnU-Net-shaped: `metric_per_case`, `mean` per class,
/// `foreground_mean`; plus ours per modality, dataset and class),
/// summary.md and dice_by_modality.svg. The rows are sorted first.
pub fn write_reports(
    out: &Path,
    rows: &mut [Row],
    skipped: &[Skipped],
    tolerance: f64,
) -> Result<()> {
    sort_rows(rows);
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let mut jl = String::new();
    let mut csv = String::from(
        "image,mask,modality,dataset,case,class,instance,x0,y0,x1,y1,area_gt,area_pred,tp,fp,fn,dice,iou,nsd,hd95\n",
    );
    for r in rows.iter() {
        jl.push_str(&r.to_json().to_string());
        jl.push('\n');
        let opt = |v: Option<u32>| v.map_or(String::new(), |x| x.to_string());
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            csv_field(&r.image),
            csv_field(&r.mask),
            csv_field(&r.modality),
            csv_field(&r.dataset),
            csv_field(&r.case),
            opt(r.class),
            opt(r.instance),
            r.bbox[0],
            r.bbox[1],
            r.bbox[2],
            r.bbox[3],
            r.area_gt,
            r.area_pred,
            r.tp,
            r.fp,
            r.fn_,
            r.dice,
            r.iou,
            r.nsd,
            r.hd95
        ));
    }
    write(&out.join("rows.jsonl"), jl.as_bytes())?;
    write(&out.join("rows.csv"), csv.as_bytes())?;
    let all: Vec<&Row> = rows.iter().collect();
    let by = |key: &dyn Fn(&Row) -> String| -> BTreeMap<String, Vec<&Row>> {
        let mut m: BTreeMap<String, Vec<&Row>> = BTreeMap::new();
        for r in rows.iter() {
            m.entry(key(r)).or_default().push(r);
        }
        m
    };
    let class_key = |r: &Row| r.class.map_or(UNKNOWN.to_string(), |c| c.to_string());
    let modality = by(&|r| r.modality.clone());
    let dataset = by(&|r| r.dataset.clone());
    let class = by(&class_key);
    let obj = |m: &BTreeMap<String, Vec<&Row>>| -> Value {
        Value::Object(m.iter().map(|(k, v)| (k.clone(), group_stats(v))).collect())
    };
    // nnU-Net v2's summary.json shape: per case (here: per mask) metrics
    // under the label (the class), the mean per label, the foreground mean.
    let nn_metrics = |r: &Row| {
        json!({"Dice": num(r.dice), "IoU": num(r.iou), "TP": r.tp, "FP": r.fp, "FN": r.fn_,
               "n_pred": r.area_pred, "n_ref": r.area_gt, "NSD": num(r.nsd), "HD95": num(r.hd95)})
    };
    let per_case: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"reference_file": r.mask, "prediction_file": r.image,
                        "metrics": {class_key(r): nn_metrics(r)}})
        })
        .collect();
    let mean_of = |v: &[&Row]| {
        let m = |f: &dyn Fn(&Row) -> f64| {
            num(v.iter().map(|r| f(r)).sum::<f64>() / v.len().max(1) as f64)
        };
        json!({"Dice": m(&|r| r.dice), "IoU": m(&|r| r.iou), "TP": m(&|r| r.tp as f64),
               "FP": m(&|r| r.fp as f64), "FN": m(&|r| r.fn_ as f64)})
    };
    let summary = json!({
        "protocol": "SAM-UNet test protocol (EVAL.md): box of the largest 8-connected component, no jitter; prediction at the original resolution; Dice/IoU with eps 1e-7 per mask; NSD and HD95 as DeepMind's surface_distance, spacing 1 px",
        "nsd_tolerance_px": tolerance,
        "masks": rows.len(),
        "skipped": skipped.iter().map(|s| json!({"path": s.path, "reason": s.reason})).collect::<Vec<_>>(),
        "all": group_stats(&all),
        "per_modality": obj(&modality),
        "per_dataset": obj(&dataset),
        "per_class": obj(&class),
        "metric_per_case": per_case,
        "mean": Value::Object(class.iter().map(|(k, v)| (k.clone(), mean_of(v))).collect()),
        "foreground_mean": mean_of(&all),
    });
    write(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)
            .expect("JSON")
            .as_bytes(),
    )?;
    // The Markdown table.
    let mut md = format!(
        "# Evaluation\n\n{} masks ({} skipped). Dice and IoU per mask as the authors compute them; NSD at {tolerance} px and HD95 (px) as DeepMind's surface_distance.\n\n",
        rows.len(),
        skipped.len()
    );
    for (title, groups) in [
        ("modality", &modality),
        ("dataset", &dataset),
        ("class", &class),
    ] {
        md += &format!(
            "| {title} | masks | Dice mean | Dice median | IoU mean | NSD mean | HD95 median | empty predictions |\n|---|---|---|---|---|---|---|---|\n"
        );
        let mut line = |name: &str, v: &[&Row]| {
            let s = group_stats(v);
            let f = |k: &str, m: &str| unnum(&s[k][m]).map_or("-".into(), |x| format!("{x:.4}"));
            md += &format!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} |\n",
                v.len(),
                f("dice", "mean"),
                f("dice", "median"),
                f("iou", "mean"),
                f("nsd", "mean"),
                f("hd95", "median"),
                s["empty_predictions"]
            );
        };
        for (k, v) in groups.iter() {
            line(k, v);
        }
        line("**all**", &all);
        md += "\n";
    }
    write(&out.join("summary.md"), md.as_bytes())?;
    let svg = box_plot(
        &modality
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().map(|r| r.dice).collect()))
            .collect::<Vec<_>>(),
    );
    write(&out.join("dice_by_modality.svg"), svg.as_bytes())
}

/// Reads the rows of earlier runs (their rows.jsonl), e.g. shards, into one
/// list.
pub fn read_rows(dirs: &[&Path]) -> Result<Vec<Row>> {
    let mut rows = vec![];
    // A mask in two runs means the runs overlap (the same shard twice, or a
    // merge merged again), which would count it twice.
    let mut seen: std::collections::HashMap<(String, String), usize> = Default::default();
    for (k, d) in dirs.iter().enumerate() {
        let p = d.join("rows.jsonl");
        let text = std::fs::read_to_string(&p).map_err(|e| io(&p, e))?;
        for (i, l) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: Value = serde_json::from_str(l).map_err(|e| {
                Error::input("eval merge", format!("{} line {}: {e}", p.display(), i + 1))
            })?;
            let row = Row::from_json(&v).ok_or_else(|| {
                Error::input(
                    "eval merge",
                    format!("{} line {}: not a row", p.display(), i + 1),
                )
            })?;
            // (Twice in one run is the data's list naming it twice: the
            // single run counted it twice too.)
            if let Some(first) = seen.insert((row.image.clone(), row.mask.clone()), k)
                && first != k
            {
                return Err(Error::input(
                    "eval merge",
                    format!(
                        "mask {} of {} is in {} and in {}: the runs overlap (the same shard twice?)",
                        row.mask,
                        row.image,
                        dirs[first].display(),
                        d.display()
                    ),
                ));
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The skipped masks listed in earlier runs' summary.json.
pub fn read_skipped(dirs: &[&Path]) -> Result<Vec<Skipped>> {
    let mut out = vec![];
    for d in dirs {
        let p = d.join("summary.json");
        let text = std::fs::read_to_string(&p).map_err(|e| io(&p, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::input("eval merge", format!("{}: {e}", p.display())))?;
        for s in v["skipped"].as_array().into_iter().flatten() {
            out.push(Skipped {
                path: s["path"].as_str().unwrap_or_default().into(),
                reason: s["reason"].as_str().unwrap_or_default().into(),
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Box plots (quartiles, whiskers at 1.5 IQR, outliers as dots) of values
/// in [0, 1] per group, as SVG.
pub fn box_plot(groups: &[(String, Vec<f64>)]) -> String {
    let (w, h, left, top, bottom) = (
        120.0 * groups.len().max(1) as f64 + 80.0,
        360.0,
        60.0,
        30.0,
        50.0,
    );
    let ph = h - top - bottom;
    let y = |v: f64| top + (1.0 - v.clamp(0.0, 1.0)) * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"18\" font-size=\"14\">Dice per mask, by modality</text>\n"
    );
    for t in 0..=5 {
        let v = t as f64 / 5.0;
        s += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.1}</text>\n",
            w - 20.0,
            y(v),
            y(v),
            left - 6.0,
            y(v) + 4.0
        );
    }
    for (i, (name, vals)) in groups.iter().enumerate() {
        let cx = left + 60.0 + 120.0 * i as f64;
        let mut v: Vec<f64> = vals.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        s += &format!(
            "<text x=\"{cx}\" y=\"{:.1}\" text-anchor=\"middle\">{} ({})</text>\n",
            h - bottom + 20.0,
            name.replace('&', "&amp;").replace('<', "&lt;"),
            v.len()
        );
        if v.is_empty() {
            continue;
        }
        let q = |p: f64| {
            let x = p * (v.len() - 1) as f64;
            let (a, b) = (x.floor() as usize, x.ceil() as usize);
            v[a] + (v[b] - v[a]) * (x - a as f64)
        };
        let (q1, med, q3) = (q(0.25), q(0.5), q(0.75));
        let iqr = q3 - q1;
        let lo = v
            .iter()
            .copied()
            .find(|&x| x >= q1 - 1.5 * iqr)
            .unwrap_or(q1);
        let hi = v
            .iter()
            .rev()
            .copied()
            .find(|&x| x <= q3 + 1.5 * iqr)
            .unwrap_or(q3);
        s += &format!(
            "<line x1=\"{cx}\" x2=\"{cx}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\n<rect x=\"{}\" y=\"{:.1}\" width=\"60\" height=\"{:.1}\" fill=\"#9ecae1\" stroke=\"#333\"/>\n<line x1=\"{}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#08306b\" stroke-width=\"2\"/>\n",
            y(hi),
            y(lo),
            cx - 30.0,
            y(q3),
            (y(q1) - y(q3)).max(0.5),
            cx - 30.0,
            cx + 30.0,
            y(med),
            y(med)
        );
        for &x in v.iter().filter(|&&x| x < lo || x > hi) {
            s += &format!(
                "<circle cx=\"{cx}\" cy=\"{:.1}\" r=\"2.5\" fill=\"#c33\"/>\n",
                y(x)
            );
        }
    }
    s + "</svg>\n"
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// NSD's tolerance (pixels, or mm in 3-D): a distance, finite and not negative.
pub fn check_tolerance(op: &'static str, tolerance: f64) -> Result<()> {
    if !(tolerance.is_finite() && tolerance >= 0.0) {
        return Err(Error::input(
            op,
            format!("NSD tolerance {tolerance}: a distance, finite and not negative"),
        ));
    }
    Ok(())
}
