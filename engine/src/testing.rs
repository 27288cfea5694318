//! Small fake stage kinds for engine tests, docs and benchmarks: `echo`, `sum`, `fail`,
//! `panic`, `sleep` and `bounded`. They need no ML and run in microseconds.

use serde::{Deserialize, Serialize};

use crate::error::{BoxError, ParamError};
use crate::registry::Registry;
use crate::stage::{External, NormalizeCtx, Resources, Slot, Slots, StageCtx, TypedStage};

/// Registers every fake kind.
pub fn register(reg: &mut Registry) {
    reg.register_typed::<Echo>()
        .register_typed::<Sum>()
        .register_typed::<Fail>()
        .register_typed::<Panic>()
        .register_typed::<Sleep>()
        .register_typed::<Bounded>()
        .register_typed::<Read>();
}

/// Writes `out.txt`: its `text` followed by the `out.txt` of every input.
pub struct Echo;
/// Params of [`Echo`].
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EchoParams {
    /// Text to write.
    pub text: String,
    /// An integer that only changes the key.
    pub n: i64,
    /// A float that only changes the key.
    pub x: f64,
}
impl TypedStage for Echo {
    const KIND: &'static str = "echo";
    const VERSION: u32 = 1;
    type Params = EchoParams;
    fn inputs() -> Slots {
        Slots::Any
    }
    fn outputs(_: &EchoParams) -> Vec<String> {
        vec!["out.txt".into()]
    }
    fn run(p: &EchoParams, ctx: &mut StageCtx<'_>) -> Result<(), BoxError> {
        let mut text = p.text.clone();
        for arts in ctx.all_inputs().values() {
            for a in arts {
                text.push_str(&std::fs::read_to_string(a.file("out.txt")?)?);
            }
        }
        std::fs::write(ctx.out_path("out.txt"), text)?;
        Ok(())
    }
}

/// Writes `metrics.json` with `value` = its `value` plus the values of its inputs.
pub struct Sum;
/// Params of [`Sum`].
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SumParams {
    /// Own value.
    pub value: f64,
}
impl TypedStage for Sum {
    const KIND: &'static str = "sum";
    const VERSION: u32 = 1;
    type Params = SumParams;
    fn inputs() -> Slots {
        const S: &[Slot] = &[Slot::optional("terms").many()];
        Slots::Fixed(S)
    }
    fn run(p: &SumParams, ctx: &mut StageCtx<'_>) -> Result<(), BoxError> {
        let mut v = p.value;
        for a in ctx.inputs("terms") {
            let m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(a.file("metrics.json")?)?)?;
            v += m["value"].as_f64().unwrap_or(0.0);
        }
        std::fs::write(
            ctx.out_path("metrics.json"),
            serde_json::json!({ "value": v }).to_string(),
        )?;
        Ok(())
    }
}

/// Always fails with `message`.
pub struct Fail;
/// Params of [`Fail`].
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FailParams {
    /// Error message.
    pub message: String,
}
impl TypedStage for Fail {
    const KIND: &'static str = "fail";
    const VERSION: u32 = 1;
    type Params = FailParams;
    fn inputs() -> Slots {
        Slots::Any
    }
    fn run(p: &FailParams, ctx: &mut StageCtx<'_>) -> Result<(), BoxError> {
        ctx.log("about to fail");
        Err(p.message.clone().into())
    }
    /// A message containing `hint` gets one naming the param as the engine passed it.
    fn explain_failure(params: &serde_json::Value, message: &str) -> Option<String> {
        message
            .contains("hint")
            .then(|| format!("the params were {params}"))
    }
}

/// Always panics with `message`.
pub struct Panic;
impl TypedStage for Panic {
    const KIND: &'static str = "panic";
    const VERSION: u32 = 1;
    type Params = FailParams;
    fn inputs() -> Slots {
        Slots::Any
    }
    fn run(p: &FailParams, _: &mut StageCtx<'_>) -> Result<(), BoxError> {
        panic!("{}", p.message)
    }
}

/// Sleeps `ms` milliseconds (polling cancellation), optionally holding the GPU.
pub struct Sleep;
/// Params of [`Sleep`].
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SleepParams {
    /// Milliseconds.
    pub ms: u64,
    /// Claim the GPU resource.
    pub gpu: bool,
    /// Only changes the key.
    pub tag: String,
}
impl TypedStage for Sleep {
    const KIND: &'static str = "sleep";
    const VERSION: u32 = 1;
    type Params = SleepParams;
    fn inputs() -> Slots {
        Slots::Any
    }
    fn resources(p: &SleepParams) -> Resources {
        Resources { gpu: p.gpu }
    }
    fn run(p: &SleepParams, ctx: &mut StageCtx<'_>) -> Result<(), BoxError> {
        let t0 = std::time::Instant::now();
        while t0.elapsed().as_millis() < u128::from(p.ms) {
            if ctx.is_cancelled() {
                return Err("interrupted".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::fs::write(ctx.out_path("slept.txt"), format!("{}", p.ms))?;
        Ok(())
    }
}

/// A kind with range-checked params, for validation tests.
pub struct Bounded;
/// Params of [`Bounded`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundedParams {
    /// At least 1.
    pub epochs: u32,
    /// In [0, 1].
    #[serde(default = "half")]
    pub eps: f64,
}
fn half() -> f64 {
    0.5
}
impl TypedStage for Bounded {
    const KIND: &'static str = "bounded";
    const VERSION: u32 = 1;
    type Params = BoundedParams;
    fn inputs() -> Slots {
        const S: &[Slot] = &[Slot::required("data")];
        Slots::Fixed(S)
    }
    fn check(p: &BoundedParams) -> Vec<ParamError> {
        let mut e = Vec::new();
        if p.epochs == 0 {
            e.push(ParamError::new("epochs", "expected at least 1, got 0"));
        }
        if !(0.0..=1.0).contains(&p.eps) {
            e.push(ParamError::new(
                "eps",
                format!("expected a value in [0, 1], got {}", p.eps),
            ));
        }
        e
    }
    fn run(_: &BoundedParams, ctx: &mut StageCtx<'_>) -> Result<(), BoxError> {
        std::fs::write(ctx.out_path("ok"), "")?;
        Ok(())
    }
}

/// Copies an external file (`path`, `${VAR}` expanded, relative to the pipeline file) to
/// `out.txt`. Its key follows the file's content, not its path.
pub struct Read;
/// Params of [`Read`].
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ReadParams {
    /// File to read.
    pub path: String,
}
impl TypedStage for Read {
    const KIND: &'static str = "read";
    const VERSION: u32 = 1;
    type Params = ReadParams;
    fn inputs() -> Slots {
        Slots::Any
    }
    fn canonicalize(
        mut p: ReadParams,
        ctx: &NormalizeCtx<'_>,
    ) -> Result<ReadParams, Vec<ParamError>> {
        let expanded =
            crate::value::expand_env(&p.path).map_err(|e| vec![ParamError::new("path", e)])?;
        p.path = ctx.pipeline_dir.join(expanded).display().to_string();
        Ok(p)
    }
    fn externals(p: &ReadParams) -> Vec<External> {
        vec![External {
            name: "path".into(),
            path: p.path.clone().into(),
        }]
    }
    fn key_params(_: &ReadParams) -> serde_json::Value {
        serde_json::json!({})
    }
    fn outputs(_: &ReadParams) -> Vec<String> {
        vec!["out.txt".into()]
    }
    fn run(p: &ReadParams, ctx: &mut StageCtx<'_>) -> Result<(), BoxError> {
        std::fs::copy(&p.path, ctx.out_path("out.txt")).map_err(|e| format!("{}: {e}", p.path))?;
        Ok(())
    }
}
