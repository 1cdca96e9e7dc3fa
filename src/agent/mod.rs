//! The agent side: conversation history (bounded), runtimes, and (later) the
//! executor, child-process lifecycle and result classification.

pub mod history;
pub mod runtime;
