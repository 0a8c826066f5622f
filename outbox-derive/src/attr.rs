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
    pub(crate) serializer: Option<Serializer>,
    pub(crate) version: Option<LitStr>,
}

/// `serializer = to_event` (a method) or `serializer = path::to_fn`.
pub(crate) struct Serializer {
    /// The `serializer` key, so errors can cover `serializer = ...`.
    pub(crate) key: Ident,
    pub(crate) path: Path,
}

/// `fields = [a, b]` (or `["a", "b"]`): the names with their spans.
pub(crate) struct FieldList {
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
                    Err(meta.error(format_args!(
                        "duplicate `{key}` in #[publish(...)]; give each key once, and add \
                         another #[publish(...)] attribute to emit a second message"
                    )))
                } else {
                    Ok(())
                }
            };
            let string = |example: &str| -> syn::Result<LitStr> {
                let input = meta.value()?;
                if input.peek(LitStr) {
                    input.parse()
                } else {
                    Err(input.error(format_args!(
                        "`{key}` takes a string literal, e.g. {key} = \"{example}\""
                    )))
                }
            };
            match key.as_str() {
                DESTINATION => {
                    duplicate(parsed.destination.is_some())?;
                    parsed.destination = Some(string("/topic/orders")?);
                }
                VERSION => {
                    duplicate(parsed.version.is_some())?;
                    parsed.version = Some(string("v1")?);
                }
                SERIALIZER => {
                    duplicate(parsed.serializer.is_some())?;
                    let key = meta.path.get_ident().cloned().unwrap_or_else(|| {
                        Ident::new(SERIALIZER, Span::call_site())
                    });
                    let input = meta.value()?;
                    // Accept `serializer = to_event` and `serializer = "to_event"`.
                    let path = if input.peek(LitStr) {
                        input.parse::<LitStr>()?.parse()
                    } else {
                        input.parse()
                    };
                    let path = path.map_err(|err| {
                        syn::Error::new(
                            err.span(),
                            "`serializer` takes a method name or a path to a function taking \
                             `&Model`, e.g. serializer = to_event or serializer = events::order",
                        )
                    })?;
                    parsed.serializer = Some(Serializer { key, path });
                }
                FIELDS => {
                    duplicate(parsed.fields.is_some())?;
                    let input = meta.value()?;
                    if !input.peek(syn::token::Bracket) {
                        return Err(input.error(
                            "`fields` takes a list of field names in brackets, e.g. fields = [customer, total]",
                        ));
                    }
                    let content;
                    bracketed!(content in input);
                    let names = Punctuated::<FieldName, Token![,]>::parse_terminated(&content)?
                        .into_iter()
                        .map(|name| match name {
                            FieldName::Ident(ident) => (ident.unraw().to_string(), ident.span()),
                            FieldName::Lit(lit) => (lit.value(), lit.span()),
                        })
                        .collect();
                    parsed.fields = Some(FieldList { names });
                }
                _ => {
                    return Err(meta.error(format_args!(
                        "unknown key `{}` in #[publish(...)]; expected one of: {}",
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
