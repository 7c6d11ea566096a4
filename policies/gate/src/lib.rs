//! Component adapter for the RCA#2970 gate policy; the decision lives in [`rule`].

pub mod rule;

heartgate_policy::policy!(rule::NAME, rule::decide);
