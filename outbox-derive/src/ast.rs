//! The derive's input, as a typed model that keeps the syn nodes for spans.

use syn::{Data, DeriveInput, Fields, Ident, ext::IdentExt as _};

use crate::attr::PublishAttr;

pub(crate) struct Input<'a> {
    pub(crate) original: &'a DeriveInput,
    pub(crate) fields: Vec<Field<'a>>,
    pub(crate) publishes: Vec<PublishAttr<'a>>,
}

pub(crate) struct Field<'a> {
    pub(crate) ident: &'a Ident,
    /// The key in the message body: the field name without `r#`.
    pub(crate) name: String,
    pub(crate) primary_key: bool,
    /// The scale of `#[sea_orm(column_type = "Decimal(Some((p, s)))")]`:
    /// the body keeps it even where the database does not (SQLite).
    pub(crate) decimal_scale: Option<u32>,
}

impl<'a> Input<'a> {
    pub(crate) fn from_syn(input: &'a DeriveInput) -> syn::Result<Self> {
        let named = match &input.data {
            Data::Struct(data) => match &data.fields {
                Fields::Named(named) => named,
                _ => {
                    return Err(syn::Error::new_spanned(
                        &input.ident,
                        "#[derive(Publish)] needs a struct with named fields (a SeaORM `Model`)",
                    ));
                }
            },
            _ => {
                return Err(syn::Error::new_spanned(
                    &input.ident,
                    "#[derive(Publish)] works on structs only (a SeaORM `Model`)",
                ));
            }
        };
        let fields = named
            .named
            .iter()
            .filter_map(|field| {
                let ident = field.ident.as_ref()?;
                Some(Field {
                    ident,
                    name: ident.unraw().to_string(),
                    primary_key: field.attrs.iter().any(is_primary_key),
                    decimal_scale: field.attrs.iter().find_map(decimal_scale),
                })
            })
            .collect();
        let mut publishes = Vec::new();
        let mut errors: Option<syn::Error> = None;
        for attr in input.attrs.iter().filter(|a| a.path().is_ident("publish")) {
            match PublishAttr::parse(attr) {
                Ok(parsed) => publishes.push(parsed),
                Err(err) => match &mut errors {
                    Some(all) => all.combine(err),
                    None => errors = Some(err),
                },
            }
        }
        if let Some(errors) = errors {
            return Err(errors);
        }
        Ok(Input {
            original: input,
            fields,
            publishes,
        })
    }

    pub(crate) fn primary_keys(&self) -> impl Iterator<Item = &Field<'a>> {
        self.fields.iter().filter(|f| f.primary_key)
    }
}

/// `#[sea_orm(primary_key)]`, possibly among other keys.
fn is_primary_key(attr: &syn::Attribute) -> bool {
    if !attr.path().is_ident("sea_orm") {
        return false;
    }
    let Ok(list) = attr.meta.require_list() else {
        return false;
    };
    list.tokens.clone().into_iter().any(
        |token| matches!(token, proc_macro2::TokenTree::Ident(ident) if ident == "primary_key"),
    )
}

/// `s` from `#[sea_orm(column_type = "Decimal(Some((p, s)))")]`.
fn decimal_scale(attr: &syn::Attribute) -> Option<u32> {
    if !attr.path().is_ident("sea_orm") {
        return None;
    }
    let list = attr.meta.require_list().ok()?;
    let mut tokens = list.tokens.clone().into_iter().peekable();
    while let Some(token) = tokens.next() {
        let proc_macro2::TokenTree::Ident(ident) = &token else {
            continue;
        };
        if ident != "column_type" {
            continue;
        }
        let _eq = tokens.next()?;
        let proc_macro2::TokenTree::Literal(literal) = tokens.next()? else {
            return None;
        };
        let text: String = literal
            .to_string()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let inner = text
            .strip_prefix("\"Decimal(Some((")?
            .strip_suffix(")))\"")?;
        let (_precision, scale) = inner.split_once(',')?;
        return scale.parse().ok();
    }
    None
}
