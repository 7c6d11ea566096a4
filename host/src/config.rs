//! The service's configuration file (TOML), validated before anything starts.
//!
//! ```toml
//! listen = "127.0.0.1:8080"      # optional; --listen wins
//! max_body_bytes = 262144         # optional
//!
//! [[chain.slot]]                  # optional; the built-in chain otherwise
//! name = "gate"
//! module = "builtin:gate"         # or a component file, relative to this file
//! timeout_ms = 100
//! max_memory_mib = 16
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::chain::ChainSpec;

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}`: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The configuration file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: Option<SocketAddr>,
    pub max_body_bytes: Option<usize>,
    pub chain: Option<ChainSpec>,
}

impl ConfigFile {
    /// Read and validate `path`; errors name the key and the line.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: ConfigFile = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if let Some(n) = config.max_body_bytes
            && !(1024..=16 << 20).contains(&n)
        {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: format!("`max_body_bytes` must be 1024-16777216, not {n}"),
            });
        }
        Ok(config)
    }
}
