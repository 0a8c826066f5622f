//! The crypto behind every TLS connection.
//!
//! Our dependencies compile both of rustls' crypto backends (lapin's brings
//! aws-lc-rs, ours and pgwire-replication's ring), and a client that builds
//! its TLS config from the process default (async-nats does) then panics:
//! rustls cannot pick one. We pick ring, before any connection.

/// Make ring the process's default rustls provider (once; a provider an
/// application installed first stays).
pub(crate) fn use_ring() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
