//! `mail.deliver` (`services.capnp`'s `MailDelivery`): how the host's MX
//! hands this grain its owner's mail. Only the host holds it.

use std::cell::RefCell;
use std::sync::Arc;

use capnp::capability::Rc as CapRc;
use granary_sdk::services_capnp::mail_delivery;
use granary_sdk::stream_capnp::byte_stream;

use crate::store::{Delivered, Store, StoreError};

/// The largest message taken (the MX's limit is lower).
const MAX_MESSAGE: usize = 256 << 20;

pub struct Delivery {
    pub store: Arc<Store>,
}

impl mail_delivery::Server for Delivery {
    async fn deliver(
        self: CapRc<Self>,
        params: mail_delivery::DeliverParams,
        mut results: mail_delivery::DeliverResults,
    ) -> Result<(), capnp::Error> {
        let env = params.get()?.get_envelope()?;
        let sink = Sink {
            store: self.store.clone(),
            id: env.get_id()?.to_string()?,
            from: env.get_from()?.to_string()?,
            bytes: RefCell::new(Vec::new()),
        };
        if sink.id.is_empty() {
            return Err(capnp::Error::failed("a delivery needs an id".to_owned()));
        }
        results.get().set_message(capnp_rpc::new_client(sink));
        Ok(())
    }

    async fn status(
        self: CapRc<Self>,
        _: mail_delivery::StatusParams,
        mut results: mail_delivery::StatusResults,
    ) -> Result<(), capnp::Error> {
        let store = self.store.clone();
        let (boxes, (deliveries, last)) = tokio::task::spawn_blocking(move || {
            let mut boxes = Vec::new();
            for mb in store.mailboxes()? {
                let st = store.status(mb.id)?;
                boxes.push((mb, st));
            }
            Ok::<_, StoreError>((boxes, store.delivery_counts()?))
        })
        .await
        .map_err(|e| capnp::Error::failed(e.to_string()))?
        .map_err(|e| capnp::Error::failed(e.to_string()))?;
        let mut out = results.get().init_status();
        out.set_last_delivery(last);
        out.set_deliveries(deliveries);
        let mut list = out.init_mailboxes(boxes.len() as u32);
        for (i, (mb, st)) in boxes.iter().enumerate() {
            let mut b = list.reborrow().get(i as u32);
            b.set_name(&mb.name);
            b.set_special_use(&mb.special_use);
            b.set_messages(st.messages);
            b.set_unseen(st.unseen);
            b.set_bytes(st.size);
        }
        Ok(())
    }
}

/// One delivery's bytes, stored when the host ends the stream.
struct Sink {
    store: Arc<Store>,
    id: String,
    from: String,
    bytes: RefCell<Vec<u8>>,
}

impl byte_stream::Server for Sink {
    async fn write(
        self: CapRc<Self>,
        params: byte_stream::WriteParams,
        _: byte_stream::WriteResults,
    ) -> Result<(), capnp::Error> {
        let data = params.get()?.get_bytes()?;
        let mut bytes = self.bytes.borrow_mut();
        if bytes.len() + data.len() > MAX_MESSAGE {
            return Err(capnp::Error::failed(format!(
                "the message is larger than {MAX_MESSAGE} bytes"
            )));
        }
        bytes.extend_from_slice(data);
        Ok(())
    }

    async fn end(
        self: CapRc<Self>,
        _: byte_stream::EndParams,
        _: byte_stream::EndResults,
    ) -> Result<(), capnp::Error> {
        let sink = &*self;
        let message = std::mem::take(&mut *sink.bytes.borrow_mut());
        let (store, id, from) = (sink.store.clone(), sink.id.clone(), sink.from.clone());
        let stored = tokio::task::spawn_blocking(move || store.deliver(&id, &from, &message))
            .await
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        match stored {
            Ok(Delivered::Stored { mailbox, uid }) => {
                granary_sdk::log::info(&format!(
                    "delivery {} stored in {mailbox} as uid {uid}",
                    sink.id
                ));
                Ok(())
            }
            Ok(Delivered::Duplicate) => {
                granary_sdk::log::info(&format!("delivery {} was stored before", sink.id));
                Ok(())
            }
            Err(StoreError::Full) => Err(capnp::Error::overloaded(
                "the mailbox storage is full".to_owned(),
            )),
            Err(e) => {
                granary_sdk::log::error(&format!("delivery {} failed: {e}", sink.id));
                Err(capnp::Error::failed(format!("storing the message: {e}")))
            }
        }
    }
}
