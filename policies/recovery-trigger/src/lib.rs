//! Component adapter for the MCP recovery trigger policy; the decision lives in [`rule`].

pub mod rule;

heartgate_policy::policy!(rule::NAME, rule::decide);
