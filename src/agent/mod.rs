//! The agent side: conversation history (bounded), runtimes, and (later) the
//! executor, child-process lifecycle and result classification.

pub mod classify;
pub mod history;
pub mod process;
pub mod runtime;
pub mod runtimes;
pub mod streamjson;
