//! What `#[derive(Publish)]` accepts: each file of `ui/pass` is a module of
//! this test, compiled with the suite, and its `main` (which checks the
//! messages the derive builds) runs as a test.

macro_rules! pass {
    ($($name:ident => $file:literal),* $(,)?) => {
        $(
            // The files are written as crates of their own (as trybuild ran
            // them), where `pub` is how an entity is declared.
            #[allow(unreachable_pub)]
            mod $name {
                include!($file);

                pub(super) fn run() {
                    main()
                }
            }

            #[test]
            fn $name() {
                $name::run()
            }
        )*
    };
}

pass! {
    all_keys => "ui/pass/all-keys.rs",
    composite_key => "ui/pass/composite-key.rs",
    minimal => "ui/pass/minimal.rs",
    string_field_names => "ui/pass/string-field-names.rs",
    two_destinations => "ui/pass/two-destinations.rs",
}
