//! Configuration files of the three programs (TOML): `relay.toml` ([`RelayConfig`], in
//! `relay.rs`), `server.toml` ([`ServerConfig`], in `server.rs`) and `proxy.toml`
//! ([`ProxyConfig`], in `proxy.rs`), and the types and rules they share (`shared.rs`).
//!
//! Unknown fields and bad values are errors naming the file and the line. Relative paths
//! (`key_file`, `ca_file`, `tls_cert`, `tls_key`) resolve against the folder of the
//! configuration file. Every field is documented in `docs/configuration.md`.

mod proxy;
mod relay;
mod server;
mod shared;

pub use proxy::{Forward, ProxyConfig};
pub use relay::{Cidr, ClientEntry, Grant, RelayConfig, ServerEntry};
pub use server::{ServerConfig, Target};
pub use shared::{ConfigError, Name, RelayUrl};
