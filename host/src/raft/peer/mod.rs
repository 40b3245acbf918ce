//! The peer transport: how nodes carry Raft RPCs to each other over the
//! `--raft` port, on long-lived connections (plain TCP, or mutual TLS with
//! `--tls-*`) that open with a [`wire::Hello`] handshake.
//!
//! # Layout
//! - [`wire`]: the messages and their length-prefixed framing.
//! - [`client`]: `NetworkFactory` and `PeerClient`, openraft's network, with
//!   a pool of idle connections per peer.
//! - [`server`]: the peer port, which answers the client through the local
//!   Raft and assembles snapshots sent in pieces.
//! - [`stream`]: `PeerStream`, one connection, plain or TLS.

pub mod client;
pub mod server;
pub mod stream;
pub mod wire;

#[cfg(test)]
mod tests;

pub use client::{NetworkFactory, PeerClient, PeerError};
pub use server::{PeerLimits, serve, tokens_match};
