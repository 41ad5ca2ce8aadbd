//! A `Home`'s task lists: Taskwarrior 3 client ids, through the same
//! `Tasks` server the CLI calls, pinned to the signed-in user.

use granary_model::UserName;
use granary_schema::admin_capnp::{home, tasks};

pub(super) async fn add(
    tasks: &tasks::Client,
    user: &UserName,
    params: home::AddTaskListParams,
    mut results: home::AddTaskListResults,
) -> Result<(), capnp::Error> {
    let mut req = tasks.add_client_request();
    req.get().set_user(user.as_str());
    req.get().set_label(params.get()?.get_label()?);
    let r = req.send().promise.await?;
    let r = r.get()?;
    let mut out = results.get();
    out.set_client(r.get_client()?)?;
    out.set_client_id(r.get_client_id()?);
    out.set_url(r.get_url()?);
    Ok(())
}

pub(super) async fn list(
    tasks: &tasks::Client,
    user: &UserName,
    mut results: home::TaskListsResults,
) -> Result<(), capnp::Error> {
    let mut req = tasks.clients_request();
    req.get().set_user(user.as_str());
    let r = req.send().promise.await?;
    results.get().set_clients(r.get()?.get_clients()?)?;
    Ok(())
}

/// Another user's id is answered as unknown.
pub(super) async fn revoke(
    tasks: &tasks::Client,
    user: &UserName,
    params: home::RevokeTaskListParams,
    mut results: home::RevokeTaskListResults,
) -> Result<(), capnp::Error> {
    let id = params.get()?.get_id();
    let mut list = tasks.clients_request();
    list.get().set_user(user.as_str());
    let list = list.send().promise.await?;
    let owned = list.get()?.get_clients()?.iter().any(|c| c.get_id() == id);
    if owned {
        let mut req = tasks.revoke_client_request();
        req.get().set_user(user.as_str());
        req.get().set_id(id);
        req.send().promise.await?;
    }
    results.get().set_found(owned);
    Ok(())
}
