//! Component adapter for the RCA#2970 gate policy; the decision lives in [`rule`].

pub mod rule;

use heartgate_policy::{Action, Guest, Input, PolicyError};

/// The component's export.
pub struct Policy;

impl Guest for Policy {
    fn metadata() -> heartgate_policy::Metadata {
        heartgate_policy::Metadata {
            name: rule::NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    fn evaluate(input: Input, proposed: Vec<Action>) -> Result<Vec<Action>, PolicyError> {
        Ok(rule::decide(&input, proposed))
    }
}

#[cfg(target_arch = "wasm32")]
heartgate_policy::export_policy!(Policy);
