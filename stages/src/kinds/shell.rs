//! `shell`: a user's own command as a node of the DAG (like a DVC stage).
//!
//! `cmd` runs with `sh -c` in the pipeline file's folder. It sees:
//! - `PIPE_OUT`: its empty output folder; whatever it writes there becomes the entry;
//! - `PIPE_IN_<slot>`: the entry folder of each input (a gathered or listed slot gets the
//!   folders joined with `:`);
//! - `PIPE_PARAMS`: a JSON file holding its params (every param besides `cmd` is the user's own,
//!   and all of them are part of the key);
//! - `PIPE_PARAM_<name>`: each scalar param (string, number, bool) as a variable;
//! - `PIPE_NODE` (its id) and `PIPE_KEY` (its key).
//!
//! stdout and stderr go to the node's `log.txt`; a non-zero exit fails the node with the tail of
//! stderr in the error. When the command exits, whatever it left running in its process group
//! (`cmd &`) is killed, so nothing writes into the entry after it is committed and no leftover
//! holds the node open. On cancel the command's whole process group gets SIGTERM, then SIGKILL.
//! If `pipe` itself dies without a chance to cancel (`kill -9`, the OOM killer), a watchdog
//! process SIGKILLs the group: nothing a killed run started keeps a GPU or writes on.
//!
//! **Security**: a pipeline with shell stages runs arbitrary commands as you. Run only
//! pipelines you trust, as you would a Makefile; `pipe plan FILE` prints the command of every
//! shell node that would run. What pipe itself guarantees: `outputs` are relative paths inside
//! `$PIPE_OUT` (no `..`, no absolute path: refused at plan time), no param holds a NUL, and
//! the store commits regular files and folders only (a symlink the command leaves in
//! `$PIPE_OUT` fails the node).

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pipe_engine::{BoxError, ParamError, Slots, StageCtx, TypedStage};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The `shell` kind.
pub struct Shell;

/// Params of `shell`: `cmd`, optional `outputs`, and any params of the user's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShellParams {
    /// The command, run with `sh -c`.
    pub cmd: String,
    /// Files the command must write into `$PIPE_OUT` (checked before the node is committed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// The user's own params (in the key, and in `$PIPE_PARAMS`).
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

const STDERR_TAIL: usize = 20;

impl TypedStage for Shell {
    const KIND: &'static str = "shell";
    const VERSION: u32 = 1;
    type Params = ShellParams;

    /// The command gets its inputs' entry folders: the engine checks it left them unchanged.
    fn runs_user_code() -> bool {
        true
    }

    fn inputs() -> Slots {
        Slots::Any
    }

    fn check(p: &ShellParams) -> Vec<ParamError> {
        let mut e = Vec::new();
        if p.cmd.trim().is_empty() {
            e.push(ParamError::new("cmd", "expected a non-empty command"));
        }
        for name in p.extra.keys() {
            // `PIPE_PARAM_<name>=<value>`: a `=` in the name would end the variable's name
            if name.is_empty() || name.contains('=') {
                e.push(ParamError::new(
                    name.as_str(),
                    format!(
                        "expected a param name without `=` (it becomes the environment \
                         variable PIPE_PARAM_<name>), got `{name}`"
                    ),
                ));
            }
        }
        for (i, o) in p.outputs.iter().enumerate() {
            let path = std::path::Path::new(o);
            if o.is_empty()
                || path.is_absolute()
                || path
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                e.push(ParamError::new(
                    format!("outputs[{i}]"),
                    format!("expected a relative path inside $PIPE_OUT without `..`, got `{o}`"),
                ));
            }
        }
        e
    }

    fn outputs(p: &ShellParams) -> Vec<String> {
        p.outputs.clone()
    }

    fn run(p: &ShellParams, ctx: &mut StageCtx<'_>) -> Result<(), BoxError> {
        // the command sees its params as they are keyed (`10.0` and `10` are one key, so it
        // sees `10` for both: one key, one input)
        let keyed = pipe_engine::value::canonical(&serde_json::to_value(p)?);
        let p: ShellParams = serde_json::from_value(keyed)?;
        let p = &p;
        let params_path = ctx.scratch_dir().join("params.json");
        std::fs::write(&params_path, serde_json::to_vec_pretty(p)?)
            .map_err(|e| format!("{}: {e}", params_path.display()))?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(&p.cmd)
            .current_dir(ctx.pipeline_dir())
            .env("PIPE_OUT", ctx.out_dir())
            .env("PIPE_PARAMS", &params_path)
            .env("PIPE_NODE", ctx.node_id())
            .env("PIPE_KEY", ctx.key().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::from(ctx.log_file()?))
            .stderr(Stdio::piped())
            .process_group(0);
        // the command sees the environment `pipe` was started with, not what it set for its
        // own CUDA libraries
        match crate::device::inherited_env() {
            Some((k, Some(v))) => {
                cmd.env(k, v);
            }
            Some((k, None)) => {
                cmd.env_remove(k);
            }
            None => {}
        }
        for (name, v) in &p.extra {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => continue,
            };
            cmd.env(format!("PIPE_PARAM_{name}"), text);
        }
        for (slot, arts) in ctx.all_inputs() {
            let dirs: Vec<String> = arts.iter().map(|a| a.dir.display().to_string()).collect();
            cmd.env(format!("PIPE_IN_{slot}"), dirs.join(":"));
        }
        // the watchdog runs before the command exists, so a pipe killed right after the
        // command starts still takes the command's group down with it
        let mut watchdog = Watchdog::start();
        let mut child = cmd.spawn().map_err(|e| format!("cannot start `sh`: {e}"))?;
        let pid = child.id();
        watchdog.arm(pid);

        // stderr: into the log, and its last lines kept for the error message
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        let reader = child.stderr.take().map(|stderr| {
            let tail = Arc::clone(&tail);
            let mut log = ctx.log_file();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(f) = log.as_mut() {
                        let _ = writeln!(f, "{line}");
                    }
                    if let Ok(mut t) = tail.lock() {
                        if t.len() == STDERR_TAIL {
                            t.pop_front();
                        }
                        t.push_back(line);
                    }
                }
            })
        });

        let mut cancelled_at: Option<Instant> = None;
        let status = loop {
            // (an error, e.g. a SIGCHLD ignored since pipe's start reaping children itself:
            // `wait` reports what it can, and the loop never spins on it)
            if exited_unreaped(pid).unwrap_or(true) {
                // What the command left running in its group (`cmd &`, a daemon's worker) is
                // killed now, while the unreaped leader keeps the group id from reuse: nothing
                // may write into the entry once it is committed, nor hold its stderr open and
                // the node with it.
                signal_group(pid, Signal::Kill);
                break child.wait()?;
            }
            if ctx.is_cancelled() {
                match cancelled_at {
                    None => {
                        signal_group(pid, Signal::Term);
                        cancelled_at = Some(Instant::now());
                    }
                    Some(t) if t.elapsed() > Duration::from_secs(2) => {
                        signal_group(pid, Signal::Kill)
                    }
                    Some(_) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // the group leader is reaped: its pid (= the group's id) may be reused from now on
        watchdog.stop();
        if let Some(r) = reader {
            let _ = r.join();
        }
        if cancelled_at.is_some() {
            return Err("interrupted".into());
        }
        if !status.success() {
            let tail: Vec<String> = tail
                .lock()
                .map(|t| t.iter().cloned().collect())
                .unwrap_or_default();
            let code = status
                .code()
                .map_or_else(|| "a signal".to_string(), |c| format!("code {c}"));
            let mut msg = format!("command exited with {code}");
            if !tail.is_empty() {
                msg.push_str("; stderr ends with:\n    ");
                msg.push_str(&tail.join("\n    "));
            }
            return Err(msg.into());
        }
        Ok(())
    }
}

/// Kills the command's process group if `pipe` dies first.
///
/// A small `sh` in a process group of its own (so a Ctrl-C at the terminal does not reach it)
/// blocks reading a pipe whose only write end we hold (close-on-exec, so no stage command
/// inherits it). It is started *before* the command and told the command's group id right
/// after the command starts ([`Watchdog::arm`]: one short write), so the window in which a
/// killed `pipe` would leave the command running is that write, not a process start. When
/// `pipe` dies, however it dies, the kernel closes the write end, the second read returns,
/// and the watchdog SIGKILLs the group (a watchdog never told a group just exits). When the
/// command ends normally, we kill the watchdog instead, before its group id can be reused.
struct Watchdog {
    child: Option<std::process::Child>,
    alive: Option<std::io::PipeWriter>,
}

impl Watchdog {
    fn start() -> Watchdog {
        let spawned = std::io::pipe().and_then(|(read, write)| {
            Command::new("sh")
                .arg("-c")
                // dash's `kill` takes `-s KILL --` but not `-9 --` before a negative pid
                .arg(r#"read g || exit 0; read x; kill -s KILL -- "-$g" 2>/dev/null"#)
                .arg("pipe-watchdog")
                .current_dir("/")
                .stdin(Stdio::from(read))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .map(|child| (child, write))
        });
        match spawned {
            Ok((child, write)) => Watchdog {
                child: Some(child),
                alive: Some(write),
            },
            Err(e) => {
                tracing::warn!(
                    "cannot start the watchdog of a shell command ({e}): if pipe is killed, \
                     the command keeps running"
                );
                Watchdog {
                    child: None,
                    alive: None,
                }
            }
        }
    }

    /// Tells the watchdog the group to kill.
    fn arm(&mut self, group: u32) {
        if let Some(w) = self.alive.as_mut()
            && let Err(e) = writeln!(w, "{group}")
        {
            tracing::warn!(
                "cannot arm the watchdog of a shell command ({e}): if pipe is killed, \
                 the command's process group {group} keeps running"
            );
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.alive = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Signal {
    Term,
    Kill,
}

/// Whether the command (`pid`, our child) has exited, without reaping it: its pid, which is
/// its group's id, stays taken until [`std::process::Child::wait`].
fn exited_unreaped(pid: u32) -> std::io::Result<bool> {
    let pid: libc::id_t = pid;
    // SAFETY: waitid(2) with WNOWAIT | WNOHANG only inspects our own child's state into a
    // zero-initialised siginfo_t we own; `si_pid` reads the field waitid filled (0: no change).
    #[allow(unsafe_code)]
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        if libc::waitid(libc::P_PID, pid, &mut info, flags) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(info.si_pid() != 0)
    }
}

/// Sends a signal to the command's process group (it was started as a group leader), so
/// grandchildren (`sh -c "python train.py"`) stop too.
fn signal_group(pid: u32, sig: Signal) {
    let Ok(pid) = i32::try_from(pid) else { return };
    let sig = match sig {
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
    };
    // SAFETY: kill(2) with a negative pid signals a process group; it touches no memory of ours.
    // The group is our own child's (process_group(0) above), still unreaped while we poll it.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(-pid, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalize(v: Value) -> Result<Value, Vec<ParamError>> {
        let reg = {
            let mut r = pipe_engine::Registry::new();
            crate::register_all(&mut r);
            r
        };
        reg.get("shell")
            .map(|k| {
                k.normalize(
                    v,
                    &pipe_engine::NormalizeCtx {
                        pipeline_dir: std::path::Path::new("."),
                    },
                )
            })
            .unwrap_or_else(|| Err(vec![]))
    }

    #[test]
    fn user_params_are_kept_and_cmd_is_required() {
        let v = normalize(serde_json::json!({"cmd": "echo", "lr": 0.1})).expect("valid");
        assert_eq!(v, serde_json::json!({"cmd": "echo", "lr": 0.1}));
        let e = normalize(serde_json::json!({"lr": 0.1})).expect_err("cmd missing");
        assert!(e[0].message.contains("cmd"), "{e:?}");
        let e = normalize(serde_json::json!({"cmd": "x", "outputs": ["../escape"]}))
            .expect_err("bad output");
        assert_eq!(e[0].path, "outputs[0]");
    }
}
