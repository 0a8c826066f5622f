//! Checks that need the whole input.

use std::collections::BTreeSet;

use quote::quote;

use crate::ast::Input;
use crate::destination::{check_destination, check_version};

impl Input<'_> {
    pub(crate) fn validate(&self) -> syn::Result<()> {
        let mut errors = Errors::default();
        if self.publishes.is_empty() {
            errors.push(syn::Error::new_spanned(
                &self.original.ident,
                "#[derive(Publish)] needs at least one #[publish(destination = \"...\")] attribute",
            ));
        }
        if self.primary_keys().next().is_none() {
            errors.push(syn::Error::new_spanned(
                &self.original.ident,
                "#[derive(Publish)] needs a field marked #[sea_orm(primary_key)]: its value is the body's \"id\"",
            ));
        }
        let known: Vec<&str> = self.fields.iter().map(|f| f.name.as_str()).collect();
        for publish in &self.publishes {
            match &publish.destination {
                None => errors.push(syn::Error::new_spanned(
                    publish.original,
                    "#[publish(...)] needs `destination = \"...\"`, e.g. destination = \"/topic/orders\"",
                )),
                Some(destination) => {
                    if let Err(message) = check_destination(&destination.value()) {
                        errors.push(syn::Error::new(destination.span(), message));
                    }
                }
            }
            if let Some(version) = &publish.version
                && let Err(message) = check_version(&version.value())
            {
                errors.push(syn::Error::new(version.span(), message));
            }
            if let (Some(_), Some(serializer)) = (&publish.fields, &publish.serializer) {
                let (key, path) = (&serializer.key, &serializer.path);
                errors.push(syn::Error::new_spanned(
                    quote!(#key #path),
                    "`serializer` cannot be combined with `fields` in one #[publish(...)]: \
                     the serializer builds the whole body; remove `fields` or `serializer`",
                ));
            }
            if let Some(fields) = &publish.fields {
                let mut seen = BTreeSet::new();
                for (name, span) in &fields.names {
                    if !known.contains(&name.as_str()) {
                        errors.push(syn::Error::new(
                            *span,
                            format!(
                                "unknown field `{name}` in `fields`; the fields of `{}` are: {}",
                                self.original.ident,
                                known.join(", ")
                            ),
                        ));
                    } else if !seen.insert(name.as_str()) {
                        errors.push(syn::Error::new(
                            *span,
                            format!("duplicate field `{name}` in `fields`; list each field once"),
                        ));
                    }
                }
            }
        }
        errors.finish()
    }
}

/// Gathers every problem so one compile shows them all.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, err: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(err),
            None => self.0 = Some(err),
        }
    }

    fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}
