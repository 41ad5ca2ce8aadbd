//! The gateway: what clients connect to.
//!
//! Today: TLS with certificates from the local CA ([`tls::local_ca`]) or from
//! files the admin provides ([`tls::server_config`]), and the HTTPS listener
//! ([`https`]) that answers the health check. Routing to grains arrives with
//! the grains and apps. The gateway never opens the state database itself:
//! what it needs to know it asks through traits the daemon implements.

pub mod https;
pub mod proxy;
pub mod ssh;
pub mod tls;
