//! The `heartgate` command's parts: its arguments (`args`), the service
//! (`serve`), the operator's commands on the database (`operator`), the
//! author's local policy commands (`author`), the admin API client
//! (`remote`), and how everything is printed (`output`).

pub(crate) mod args;
pub(crate) mod author;
pub(crate) mod operator;
pub(crate) mod output;
pub(crate) mod remote;
pub(crate) mod serve;
