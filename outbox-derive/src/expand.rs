//! Writing the `Publish` impl.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::DeriveInput;

use crate::ast::Input;
use crate::attr::PublishAttr;

pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    match try_expand(input) {
        Ok(tokens) => tokens,
        // Still emit an impl, so code using the model gets no follow-up errors.
        Err(err) => {
            let fallback = fallback(input);
            let err = err.into_compile_error();
            quote!(#err #fallback)
        }
    }
}

fn try_expand(input: &DeriveInput) -> syn::Result<TokenStream> {
    let input = Input::from_syn(input)?;
    input.validate()?;
    let messages = input
        .publishes
        .iter()
        .map(|publish| message(&input, publish));
    let count = input.publishes.len();
    let body = quote! {
        use ::outbox_core::__private::{ViaBodyValue as _, ViaSerialize as _};
        let mut messages = ::std::vec::Vec::with_capacity(#count);
        #( messages.push(#messages); )*
        ::std::result::Result::Ok(messages)
    };
    Ok(wrap(input.original, body))
}

fn message(input: &Input<'_>, publish: &PublishAttr<'_>) -> TokenStream {
    let destination = publish
        .destination
        .as_ref()
        .map(|d| d.value())
        .unwrap_or_default();
    let body = match &publish.serializer {
        Some(serializer) => {
            let serializer = &serializer.path;
            // A bare name is a method on the model; a path is a function taking `&Model`.
            let call = match serializer.get_ident() {
                Some(method) => quote_spanned!(method.span()=> self.#method()),
                None => {
                    quote_spanned!(serializer.segments.last().map_or_else(proc_macro2::Span::call_site, |s| s.ident.span())=> #serializer(self))
                }
            };
            quote! {
                ::outbox_core::__private::serialize_body(#destination, &#call)?
            }
        }
        None => {
            let id = encode_id(input, &destination);
            let selected = input.fields.iter().filter(|field| {
                !field.primary_key
                    && publish
                        .fields
                        .as_ref()
                        .is_none_or(|list| list.names.iter().any(|(name, _)| *name == field.name))
            });
            let entries = selected.map(|field| {
                let ident = field.ident;
                let name = &field.name;
                let encoded = quote!((&&::outbox_core::__private::Encoder(&self.#ident)).encode());
                let encoded = match field.decimal_scale {
                    Some(scale) => quote!(::outbox_core::__private::with_scale(#encoded, #scale)),
                    None => encoded,
                };
                quote! {
                    map.insert(
                        ::std::string::String::from(#name),
                        ::outbox_core::__private::field(#destination, #encoded)?,
                    );
                }
            });
            quote! {{
                let mut map = ::outbox_core::__private::serde_json::Map::new();
                map.insert(::std::string::String::from("id"), #id);
                #( #entries )*
                ::outbox_core::__private::serde_json::Value::Object(map)
            }}
        }
    };
    let version = publish
        .version
        .as_ref()
        .map(|version| quote!(.with_version(#version)?));
    quote! {
        ::outbox_core::__private::message(#destination, #body)? #version
    }
}

/// The body's `"id"`: the primary key, or an array for a composite key.
fn encode_id(input: &Input<'_>, destination: &str) -> TokenStream {
    let keys: Vec<TokenStream> = input
        .primary_keys()
        .map(|field| {
            let ident = field.ident;
            quote! {
                ::outbox_core::__private::field(#destination, (&&::outbox_core::__private::Encoder(&self.#ident)).encode())?
            }
        })
        .collect();
    if keys.len() == 1 {
        keys.into_iter().collect()
    } else {
        quote!(::outbox_core::__private::serde_json::Value::Array(
            ::std::vec![#(#keys),*]
        ))
    }
}

fn wrap(input: &DeriveInput, body: TokenStream) -> TokenStream {
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    quote! {
        #[allow(non_upper_case_globals, unused_qualifications, clippy::all)]
        const _: () = {
            #[automatically_derived]
            impl #impl_generics ::outbox_core::Publish for #ident #ty_generics #where_clause {
                fn outbox_messages(&self) -> ::outbox_core::Result<::std::vec::Vec<::outbox_core::Message>> {
                    #body
                }
            }
        };
    }
}

fn fallback(input: &DeriveInput) -> TokenStream {
    wrap(
        input,
        quote!(::std::unreachable!("#[derive(Publish)] failed to expand")),
    )
}
