//! Parsing one `#[publish(...)]` attribute.

use proc_macro2::Span;
use syn::{Attribute, Ident, LitStr, Path, Token, bracketed, punctuated::Punctuated};

/// The keys `#[publish(...)]` accepts, in the order the docs list them.
pub(crate) const DESTINATION: &str = "destination";
pub(crate) const FIELDS: &str = "fields";
pub(crate) const SERIALIZER: &str = "serializer";
pub(crate) const VERSION: &str = "version";
const KEYS: &[&str] = &[DESTINATION, FIELDS, SERIALIZER, VERSION];

/// One `#[publish(...)]`, as written.
pub(crate) struct PublishAttr<'a> {
    pub(crate) original: &'a Attribute,
    pub(crate) destination: Option<LitStr>,
    pub(crate) fields: Option<FieldList>,
    pub(crate) serializer: Option<Path>,
    pub(crate) version: Option<LitStr>,
}

/// `fields = [a, b]` (or `["a", "b"]`): the names with their spans.
pub(crate) struct FieldList {
    pub(crate) key_span: Span,
    pub(crate) names: Vec<(String, Span)>,
}

enum FieldName {
    Ident(Ident),
    Lit(LitStr),
}

impl syn::parse::Parse for FieldName {
    fn parse(input: syn::parse::ParseStream) -> syn::Result<Self> {
        let lookahead = input.lookahead1();
        if lookahead.peek(LitStr) {
            input.parse().map(FieldName::Lit)
        } else if lookahead.peek(Ident::peek_any) {
            syn::ext::IdentExt::parse_any(input).map(FieldName::Ident)
        } else {
            Err(lookahead.error())
        }
    }
}

use syn::ext::IdentExt as _;

impl<'a> PublishAttr<'a> {
    pub(crate) fn parse(attr: &'a Attribute) -> syn::Result<Self> {
        let mut parsed = PublishAttr {
            original: attr,
            destination: None,
            fields: None,
            serializer: None,
            version: None,
        };
        attr.parse_nested_meta(|meta| {
            let key = meta
                .path
                .get_ident()
                .map(|ident| ident.unraw().to_string())
                .unwrap_or_default();
            let duplicate = |present: bool| {
                if present {
                    Err(meta.error(format_args!("duplicate `{key}` in #[publish(...)]")))
                } else {
                    Ok(())
                }
            };
            match key.as_str() {
                DESTINATION => {
                    duplicate(parsed.destination.is_some())?;
                    parsed.destination = Some(meta.value()?.parse()?);
                }
                VERSION => {
                    duplicate(parsed.version.is_some())?;
                    parsed.version = Some(meta.value()?.parse()?);
                }
                SERIALIZER => {
                    duplicate(parsed.serializer.is_some())?;
                    let input = meta.value()?;
                    // Accept `serializer = to_event` and `serializer = "to_event"`.
                    parsed.serializer = Some(if input.peek(LitStr) {
                        input.parse::<LitStr>()?.parse()?
                    } else {
                        input.parse()?
                    });
                }
                FIELDS => {
                    duplicate(parsed.fields.is_some())?;
                    let key_span = meta
                        .path
                        .get_ident()
                        .map_or_else(Span::call_site, Ident::span);
                    let input = meta.value()?;
                    let content;
                    bracketed!(content in input);
                    let names = Punctuated::<FieldName, Token![,]>::parse_terminated(&content)?
                        .into_iter()
                        .map(|name| match name {
                            FieldName::Ident(ident) => (ident.unraw().to_string(), ident.span()),
                            FieldName::Lit(lit) => (lit.value(), lit.span()),
                        })
                        .collect();
                    parsed.fields = Some(FieldList { key_span, names });
                }
                _ => {
                    return Err(meta.error(format_args!(
                        "unknown publish attribute `{}`; expected one of: {}",
                        path_text(&meta.path),
                        KEYS.join(", ")
                    )));
                }
            }
            Ok(())
        })?;
        Ok(parsed)
    }
}

fn path_text(path: &Path) -> String {
    path.segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect::<Vec<_>>()
        .join("::")
}
