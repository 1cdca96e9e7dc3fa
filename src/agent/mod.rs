//! The agent side: conversation history (bounded), the runtimes that answer
//! prompts, child-process lifecycle, stream-json parsing, result
//! classification, the mapping of agentd sessions to CLI sessions, and the
//! executor that runs them all within bounds.

pub mod acp;
pub mod classify;
pub mod executor;
pub mod history;
pub mod permissions;
pub mod process;
pub mod replay;
pub mod runtime;
pub mod runtimes;
pub mod sessions;
pub mod streamjson;
