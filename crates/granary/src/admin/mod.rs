//! The CLI side of the admin interface: connect to the running daemon's
//! socket, make one call, print the answer as a table or JSON.

pub(crate) mod client;
mod connection;
mod table;
