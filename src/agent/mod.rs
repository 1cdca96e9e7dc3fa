//! The agent side: conversation history (bounded), the runtimes that answer
//! prompts, child-process lifecycle, stream-json parsing, result
//! classification, and the executor that runs them all within bounds.

pub mod classify;
pub mod executor;
pub mod history;
pub mod process;
pub mod replay;
pub mod runtime;
pub mod runtimes;
pub mod streamjson;
