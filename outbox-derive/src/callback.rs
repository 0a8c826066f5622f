//! `#[callback]` and `#[callback(batch)]`: register an async fn under its
//! full path, as a per-message or a per-batch callback.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::ItemFn;

pub(crate) fn expand(args: TokenStream, item: ItemFn) -> TokenStream {
    match check(&args, &item) {
        Ok(kind) => {
            let ident = &item.sig.ident;
            let name = ident.to_string();
            let shim = format_ident!("__outbox_callback_{}", ident);
            let (input, future, entry) = match kind {
                Kind::Message => (
                    quote!(::outbox_core::Payload),
                    quote!(::outbox_core::__private::CallbackFuture),
                    quote!(new),
                ),
                Kind::Batch => (
                    quote!(::outbox_core::Batch),
                    quote!(::outbox_core::__private::BatchFuture),
                    quote!(batch),
                ),
            };
            quote! {
                #item

                #[doc(hidden)]
                #[allow(non_snake_case)]
                fn #shim(input: #input) -> #future {
                    ::std::boxed::Box::pin(#ident(input))
                }

                ::outbox_core::__private::inventory::submit! {
                    ::outbox_core::__private::CallbackEntry::#entry(
                        ::core::concat!(::core::module_path!(), "::", #name),
                        #shim,
                    )
                }
            }
        }
        // Emit the function anyway, so its own errors are reported.
        Err(err) => {
            let err = err.into_compile_error();
            quote!(#err #item)
        }
    }
}

enum Kind {
    Message,
    Batch,
}

fn check(args: &TokenStream, item: &ItemFn) -> syn::Result<Kind> {
    let kind = if args.is_empty() {
        Kind::Message
    } else {
        match syn::parse2::<syn::Ident>(args.clone()) {
            Ok(word) if word == "batch" => Kind::Batch,
            _ => {
                return Err(syn::Error::new_spanned(
                    args,
                    "#[callback] takes no arguments, or `batch` (`#[callback(batch)]`) for a callback that gets a whole `Batch`; it is registered under its full path",
                ));
            }
        }
    };
    let signature = match kind {
        Kind::Message => "`async fn(payload: Payload) -> CallbackResult`",
        Kind::Batch => "`async fn(batch: Batch) -> BatchResult`",
    };
    if item.sig.asyncness.is_none() {
        return Err(syn::Error::new_spanned(
            item.sig.fn_token,
            format!("#[callback] needs an {signature}"),
        ));
    }
    if item.sig.inputs.len() != 1 || !item.sig.generics.params.is_empty() {
        let what = match kind {
            Kind::Message => "the `Payload`",
            Kind::Batch => "the `Batch`",
        };
        return Err(syn::Error::new_spanned(
            &item.sig.inputs,
            format!("#[callback] needs exactly one argument, {what}: {signature}"),
        ));
    }
    Ok(kind)
}
