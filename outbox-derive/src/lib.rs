//! Implementation detail of `outbox-core`: `#[derive(Publish)]` and `#[callback]`.
//!
//! Use them through `outbox_core::Publish` and `outbox_core::callback`; they
//! are documented there.

mod ast;
mod attr;
mod callback;
mod destination;
mod expand;
mod valid;

use proc_macro::TokenStream;
use syn::{DeriveInput, ItemFn, parse_macro_input};

/// Emit outbox rows on every save of a SeaORM model. See `outbox_core::Publish`.
#[proc_macro_derive(Publish, attributes(publish))]
pub fn derive_publish(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::derive(&input).into()
}

/// Register an async fn as a subscriber callback under its full path. See
/// `outbox_core::callback`.
#[proc_macro_attribute]
pub fn callback(args: TokenStream, item: TokenStream) -> TokenStream {
    let item = parse_macro_input!(item as ItemFn);
    callback::expand(args.into(), item).into()
}
