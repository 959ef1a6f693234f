//! Broker events and the rule dispatcher that turns them into database work.

mod dispatcher;
mod event;

pub use dispatcher::{Dispatcher, Injection, Pool};
pub use event::*;
