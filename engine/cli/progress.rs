//! Rendering run events: indicatif bars on a terminal, plain log lines otherwise.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pipe_engine::{Event, Observer, Outcome, Plan, StageEvent};

/// Draws a multi-progress: an overall bar plus one line per running node.
pub struct Bars {
    mp: MultiProgress,
    overall: Option<ProgressBar>,
    nodes: HashMap<usize, ProgressBar>,
}

impl Bars {
    pub fn new() -> Self {
        Bars {
            mp: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            overall: None,
            nodes: HashMap::new(),
        }
    }
}

fn node_style() -> ProgressStyle {
    ProgressStyle::with_template("  {spinner} {prefix:.bold} {wide_msg} {elapsed:>5}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn node_bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "  {spinner} {prefix:.bold} [{bar:25}] {pos}/{len} {msg} {per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

impl Observer for Bars {
    fn event(&mut self, plan: &Plan, event: &Event) {
        let nodes = &plan.graph.nodes;
        match event {
            Event::Start { to_run, cached } => {
                if *cached > 0 {
                    let _ = self.mp.println(format!("{cached} node(s) cached"));
                }
                let bar = self.mp.add(ProgressBar::new(*to_run as u64));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:.bold} [{bar:30}] {pos}/{len} nodes {elapsed}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix("pipe");
                bar.enable_steady_tick(Duration::from_millis(200));
                self.overall = Some(bar);
            }
            Event::Started(i) => {
                let bar = self.mp.add(ProgressBar::new_spinner());
                bar.set_style(node_style());
                bar.set_prefix(nodes[*i].id.clone());
                bar.set_message("running");
                bar.enable_steady_tick(Duration::from_millis(120));
                self.nodes.insert(*i, bar);
            }
            Event::Waiting(i, pid) => {
                if let Some(b) = self.nodes.get(i) {
                    let who = pid
                        .map(|p| format!(" (held by pid {p})"))
                        .unwrap_or_default();
                    b.set_message(format!("waiting for its lock{who}"));
                }
            }
            Event::Stage(
                i,
                StageEvent::Progress {
                    done,
                    total,
                    message,
                },
            ) => {
                if let Some(b) = self.nodes.get(i) {
                    if b.length() != Some(*total) {
                        b.set_style(node_bar_style());
                        b.set_length(*total);
                    }
                    b.set_position(*done);
                    b.set_message(message.clone());
                }
            }
            Event::Stage(_, StageEvent::Log(_)) => {}
            Event::Finished(i, r) => {
                if let Some(b) = self.nodes.remove(i) {
                    b.finish_and_clear();
                    self.mp.remove(&b);
                }
                let id = &nodes[*i].id;
                let line = match &r.outcome {
                    Outcome::Ran => Some(format!("  done    {id} ({:.1}s)", r.seconds)),
                    Outcome::Cached => Some(format!("  cached  {id} (computed by another run)")),
                    Outcome::Failed(m) => Some(format!("  FAILED  {id}: {m}")),
                    Outcome::Skipped => Some(format!("  skipped {id}")),
                    Outcome::NotNeeded => None,
                };
                if let Some(line) = line {
                    let _ = self.mp.println(line);
                }
                if matches!(
                    r.outcome,
                    Outcome::Ran | Outcome::Cached | Outcome::Failed(_)
                ) && let Some(o) = &self.overall
                {
                    o.inc(1);
                }
            }
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        if let Some(o) = &self.overall {
            o.finish_and_clear();
        }
    }
}

/// Plain lines on stderr, for logs and CI: the nodes' starts and ends, and each running node's
/// progress at most every [`Lines::EVERY`] (its first and last report always), so that a long
/// run under `nohup`, Slurm or a timeout says how far it got and how fast.
#[derive(Default)]
pub struct Lines {
    last: HashMap<usize, Instant>,
}

impl Lines {
    /// The least time between two progress lines of one node.
    pub const EVERY: Duration = Duration::from_secs(30);
}

impl Observer for Lines {
    fn event(&mut self, plan: &Plan, event: &Event) {
        let nodes = &plan.graph.nodes;
        match event {
            Event::Start { to_run, cached } => {
                say!("pipe: {to_run} node(s) to run, {cached} cached")
            }
            Event::Started(i) => say!("  start   {}", nodes[*i].id),
            Event::Waiting(i, pid) => say!(
                "  waiting {} for its lock{}",
                nodes[*i].id,
                pid.map(|p| format!(" (held by pid {p})"))
                    .unwrap_or_default()
            ),
            Event::Stage(
                i,
                StageEvent::Progress {
                    done,
                    total,
                    message,
                },
            ) => {
                let due = self.last.get(i).is_none_or(|t| t.elapsed() >= Self::EVERY);
                if due || done >= total {
                    self.last.insert(*i, Instant::now());
                    say!("  ...     {}: {done}/{total} {message}", nodes[*i].id);
                }
            }
            Event::Stage(..) => {}
            Event::Finished(i, r) => {
                self.last.remove(i);
                let id = &nodes[*i].id;
                match &r.outcome {
                    Outcome::Ran => say!("  done    {id} ({:.1}s)", r.seconds),
                    Outcome::Cached => say!("  cached  {id} (computed by another run)"),
                    Outcome::Failed(m) => say!("  FAILED  {id}: {m}"),
                    Outcome::Skipped => say!("  skipped {id}"),
                    Outcome::NotNeeded => {}
                }
            }
        }
    }
}
