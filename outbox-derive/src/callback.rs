//! `#[callback]`: register an async fn under its full path.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::ItemFn;

pub(crate) fn expand(args: TokenStream, item: ItemFn) -> TokenStream {
    match check(&args, &item) {
        Ok(()) => {
            let ident = &item.sig.ident;
            let name = ident.to_string();
            let shim = format_ident!("__outbox_callback_{}", ident);
            quote! {
                #item

                #[doc(hidden)]
                #[allow(non_snake_case)]
                fn #shim(
                    payload: ::outbox_core::Payload,
                ) -> ::outbox_core::__private::CallbackFuture {
                    ::std::boxed::Box::pin(#ident(payload))
                }

                ::outbox_core::__private::inventory::submit! {
                    ::outbox_core::__private::CallbackEntry::new(
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

fn check(args: &TokenStream, item: &ItemFn) -> syn::Result<()> {
    if !args.is_empty() {
        return Err(syn::Error::new_spanned(
            args,
            "#[callback] takes no arguments; the callback is registered under its full path",
        ));
    }
    if item.sig.asyncness.is_none() {
        return Err(syn::Error::new_spanned(
            item.sig.fn_token,
            "#[callback] needs an `async fn(payload: Payload) -> CallbackResult`",
        ));
    }
    if item.sig.inputs.len() != 1 || !item.sig.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &item.sig.inputs,
            "#[callback] needs exactly one argument, the `Payload`: `async fn(payload: Payload) -> CallbackResult`",
        ));
    }
    Ok(())
}
