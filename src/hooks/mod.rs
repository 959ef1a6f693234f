//! The rule dispatcher: turns broker events into rule matches, queued writes and the reads
//! that subscribe and connect rules need.

mod dispatcher;

pub use dispatcher::{compile, compile_rule, Dispatcher, StoredReads};
