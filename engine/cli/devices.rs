//! `pipe devices`: what this binary can compute on.

use anyhow::Result;
use pipe_stages::device::{Inventory, inventory};

/// Prints the inventory (text, or one JSON document with `--json`); exit code 0.
pub fn run(json: bool) -> Result<u8> {
    let inv = inventory();
    if json {
        let mut doc = serde_json::to_value(&inv)?;
        if let Some(obj) = doc.as_object_mut() {
            obj.insert("version".into(), env!("CARGO_PKG_VERSION").into());
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", text(&inv));
    }
    Ok(0)
}

/// The human-readable listing.
fn text(inv: &Inventory) -> String {
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    let mut out = String::new();
    let build = match (inv.cuda_built, inv.cuda_kernels_for) {
        (false, _) => {
            "built without CUDA (CPU only; `--features cuda` for NVIDIA GPUs)".to_string()
        }
        (true, Some(cap)) => format!("built with CUDA, kernels for compute capability {cap}"),
        (true, None) => "built with CUDA".to_string(),
    };
    out += &format!("pipe {}: {build}\n", env!("CARGO_PKG_VERSION"));
    out += &format!(
        "cpu      {} threads ({} logical CPUs)\n",
        inv.cpu_threads, inv.cpu_logical
    );
    for d in &inv.cuda_devices {
        let mut line = format!(
            "{:<8} {}",
            d.device,
            d.name.as_deref().unwrap_or("(unnamed)")
        );
        if let Some(cc) = &d.compute_capability {
            line += &format!(", compute {cc}");
        }
        if let Some(m) = d.memory_bytes {
            line += &format!(", {:.1} GiB", gib(m));
            if let Some(f) = d.free_bytes {
                line += &format!(" ({:.1} GiB free)", gib(f));
            }
        }
        match &d.error {
            None => line += ", ok",
            Some(e) => line += &format!(", NOT USABLE: {e}"),
        }
        if let (Some(cc), Some(built)) = (&d.compute_capability, inv.cuda_kernels_for) {
            let want: String = built.chars().filter(char::is_ascii_digit).collect();
            if cc.replace('.', "") != want {
                line += &format!(
                    " (kernels were built for {built}: rebuild with CUDA_COMPUTE_CAP={})",
                    cc.replace('.', "")
                );
            }
        }
        out += &line;
        out.push('\n');
    }
    if let Some(why) = &inv.cuda_unavailable {
        out += &format!("cuda     none usable: {why}\n");
    }
    if inv.cuda_built {
        out += &format!(
            "math     CUDA f32 matmuls and convolutions in {} ({}: fp32 or tf32)\n",
            inv.cuda_math,
            pipe_stages::device::CUDA_MATH_ENV
        );
    }
    out += &format!("auto     {}\n", inv.auto);
    out
}
