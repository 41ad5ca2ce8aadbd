//! The supervisor: grain lifecycle and the host side of each grain's
//! channel. So far only connection hand-off exists ([`handoff`]); starting,
//! stopping and granting arrive with the rest of the grains issue.

#![allow(unsafe_code)] // taking ownership of descriptors received with SCM_RIGHTS

pub mod handoff;
