//! The tasks grain: each user's Taskwarrior task lists in a grain of
//! their own, synced by Taskwarrior 3 (TaskChampion, over the `http`
//! service) and Taskwarrior 2.6 (taskd, over the `taskd` service).
//!
//! The two are separate task lists: TaskChampion stores encrypted
//! operation logs the server cannot read, taskd stores plain task JSON
//! lines it merges itself; neither can be turned into the other on the
//! server.

pub mod http;
pub mod store;
pub mod taskd;
pub mod taskd_service;
