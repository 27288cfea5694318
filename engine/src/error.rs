//! Errors of the engine: spec errors (collected, never fail-fast) and run errors.

use std::fmt;
use std::path::PathBuf;

/// A boxed error as returned by a stage: `?` works on any error type inside a stage body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One problem in a pipeline spec, pointing at the file, the line and the YAML path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SpecError {
    /// Pipeline file the error is in.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub col: Option<usize>,
    /// YAML path such as `stages.pretrain.params.epochs` (empty for the whole document).
    pub path: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.col {
                write!(f, ":{col}")?;
            }
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

/// All the problems found in one spec, sorted by position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} error{} in pipeline spec",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// A problem with one param of a stage, relative to the stage's params.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamError {
    /// Path inside the params, such as `epochs` or `attacks[0].eps` (empty: the params as a whole).
    pub path: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl ParamError {
    /// A param error at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ParamError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Errors of the engine outside spec validation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec is invalid (every problem is listed).
    #[error("{0}")]
    Spec(#[from] SpecErrors),
    /// Reading a file failed.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] pipe_cache::StoreError),
    /// A command-line override is malformed or names nothing.
    #[error("{0}")]
    Usage(String),
    /// Entries a run would read are damaged, and recomputing them was not allowed
    /// ([`crate::integrity::OnCorrupt::Fail`]).
    #[error("{}", corrupt_message(.0))]
    Corrupt(Vec<crate::integrity::Corruption>),
}

fn corrupt_message(found: &[crate::integrity::Corruption]) -> String {
    let mut s = format!(
        "{} damaged store entr{} would be read by this run (nothing was run):",
        found.len(),
        if found.len() == 1 { "y" } else { "ies" }
    );
    for c in found {
        s.push_str(&format!("\n  {c}"));
    }
    s.push_str("\nrun without --no-recompute to move the damaged entries aside and recompute them");
    s
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
