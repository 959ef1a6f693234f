//! What the SQL databases share: custom `sql` statement lists compiled from `${var}` templates.

use super::CustomAction;
use crate::actions::{ParamStyle, Statement};
use crate::config::Db;
use crate::model::{Event, Hook, Value};
use std::sync::Arc;

/// How a database spells positional parameters.
pub fn param_style(db: Db) -> ParamStyle {
    match db {
        Db::Pgsql => ParamStyle::Numbered,
        _ => ParamStyle::Question,
    }
}

/// A rule's `sql` list: each statement's text with positional parameters, and the variables
/// bound to them in order.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SqlAction {
    pub stmts: Vec<Statement>,
}

impl SqlAction {
    pub fn compile(items: &[&str], style: ParamStyle, hook: Hook) -> Result<Arc<dyn CustomAction>, String> {
        let stmts = items
            .iter()
            .map(|s| Statement::compile(s, style, hook).map_err(|e| format!("in `{s}`: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(SqlAction { stmts }))
    }

    pub fn revive(spooled: &serde_json::Value) -> Result<Arc<dyn CustomAction>, String> {
        let stmts = serde_json::from_value(spooled["sql"].clone()).map_err(|e| format!("a spooled sql action: {e}"))?;
        Ok(Arc::new(SqlAction { stmts }))
    }
}

impl CustomAction for SqlAction {
    fn bind(&self, ev: &Event, node: &Arc<str>) -> Vec<Vec<Value>> {
        self.stmts.iter().map(|s| s.bind(ev, node)).collect()
    }

    fn spool(&self) -> serde_json::Value {
        serde_json::json!({ "sql": self.stmts })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
