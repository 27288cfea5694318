//! Stage kinds, one module each.

pub mod shell;
