//! `#[distrpc::function]`: makes a function callable by name from other workers.
//!
//! ```text
//! #[distrpc::function]
//! fn add(a: i64, b: i64) -> i64 { a + b }
//! ```
//! expands to
//! - `const add: distrpc::Function<(i64, i64), i64, fn(i64, i64) -> i64>`: the typed handle
//!   callers pass to `rpc_sync` / `rpc_async`; it derefs to the function, so `add(1, 2)` still
//!   calls it locally;
//! - the function itself, renamed `__distrpc_impl_add`;
//! - a registration, collected at startup by every process built with it, under the stable
//!   name `concat!(module_path!(), "::add")` (or `name = "..."` if given).
//!
//! `#[distrpc::function(method)]` marks a method: its first parameter is `&T`, its handle a
//! `distrpc::Method<T, A, R, _>`, called through a remote reference to a `T`
//! (`rref.rpc_sync(method, args)`); it runs on the owner with the value. Other parameters are
//! received by value: a reference parameter is a compile error that says so. A method may be
//! `async` too: its task holds the value while it waits.
//!
//! `#[distrpc::function(inline)]` marks a sync function as quick and never blocking: once its
//! runs have shown it quick, it runs on the connection's reader instead of the handler pool
//! (one thread hand-off less per call). Without it a sync function always runs on the pool, so
//! that one that blocks or computes never holds up other calls' replies.
//!
//! A function returning `Result<T, E>` (any path ending in `Result`) has handle type
//! `Function<A, T>`; its `Err` reaches the caller as a remote error carrying `E`'s type name and
//! message. An `async fn` runs as a task and holds no worker thread while it waits.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::{format_ident, quote};
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::{FnArg, GenericArgument, ItemFn, LitStr, PathArguments, ReturnType, Token, Type};

#[derive(Default)]
struct Args {
    name: Option<LitStr>,
    inline: Option<syn::Ident>,
    method: Option<syn::Ident>,
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut args = Self::default();
        while !input.is_empty() {
            let key: syn::Ident = input.parse()?;
            if key == "name" && args.name.is_none() {
                input.parse::<Token![=]>()?;
                args.name = Some(input.parse()?);
            } else if key == "inline" && args.inline.is_none() {
                args.inline = Some(key);
            } else if key == "method" && args.method.is_none() {
                args.method = Some(key);
            } else {
                return Err(syn::Error::new(
                    key.span(),
                    "expected `name = \"...\"`, `inline` or `method`, each at most once",
                ));
            }
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(args)
    }
}

/// The `Ok` type of a return type spelled `...Result<T, ...>`, if it is one.
fn result_ok_type(ty: &Type) -> Option<&Type> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        GenericArgument::Type(t) => Some(t),
        _ => None,
    }
}

/// Registers a function for remote calls; see the crate docs.
#[proc_macro_attribute]
pub fn function(attr: TokenStream, item: TokenStream) -> TokenStream {
    let args = syn::parse_macro_input!(attr as Args);
    let func = syn::parse_macro_input!(item as ItemFn);
    match expand(args, func) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand(args: Args, func: ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    let sig = &func.sig;
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "remote functions cannot be generic",
        ));
    }
    let mut types = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => {
                return Err(syn::Error::new(
                    r.span(),
                    "remote functions cannot take `self`",
                ));
            }
            FnArg::Typed(t) => types.push((*t.ty).clone()),
        }
    }
    // `method`: the first parameter, `&T`, is the value behind a remote reference to a `T`.
    let receiver = match (&args.method, types.first()) {
        (Some(_), Some(Type::Reference(r))) if r.mutability.is_some() => {
            return Err(syn::Error::new(
                r.span(),
                "a method receives the referenced value as `&T`; use interior mutability (a Mutex, atomics) to change it",
            ));
        }
        (Some(_), Some(Type::Reference(r))) => Some((*r.elem).clone()),
        (Some(m), _) => {
            return Err(syn::Error::new(
                m.span(),
                "a method's first parameter is the value behind the remote reference, as `&T`",
            ));
        }
        (None, _) => None,
    };
    if let (Some(inline), Some(_)) = (&args.inline, &sig.asyncness) {
        return Err(syn::Error::new(
            inline.span(),
            "`inline` is for sync functions: an async function never holds the reader",
        ));
    }
    let skip = usize::from(receiver.is_some());
    if let Some(r) = types
        .iter()
        .skip(skip)
        .find(|t| matches!(t, Type::Reference(_)))
    {
        return Err(syn::Error::new(
            r.span(),
            "a remote function receives its arguments by value (`String` for `&str`, `Vec<T>` for `&[T]`); a method on the value behind a remote reference is marked `#[distrpc::function(method)]`",
        ));
    }
    let arg_types = if receiver.is_some() {
        &types[1..]
    } else {
        &types[..]
    };
    let idents: Vec<_> = (0..arg_types.len())
        .map(|i| format_ident!("__a{}", i))
        .collect();
    let ident = &sig.ident;
    let vis = &func.vis;
    let impl_ident = format_ident!("__distrpc_impl_{}", ident);
    let docs: Vec<_> = func
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .collect();
    let name = match &args.name {
        Some(lit) => quote!(#lit),
        None => quote!(concat!(module_path!(), "::", stringify!(#ident))),
    };
    let (ok_ty, fallible) = match &sig.output {
        ReturnType::Default => (syn::parse_quote!(()), false),
        ReturnType::Type(_, ty) => match result_ok_type(ty) {
            Some(ok) => (ok.clone(), true),
            None => ((**ty).clone(), false),
        },
    };
    let args_ty = quote!((#(#arg_types,)*));
    let ret_ty: Type = match &sig.output {
        ReturnType::Default => syn::parse_quote!(()),
        ReturnType::Type(_, ty) => (**ty).clone(),
    };
    let all_types: Vec<&Type> = types.iter().collect();
    let local_ident = format_ident!("__distrpc_local_{}", ident);
    let all_idents: Vec<_> = (0..types.len())
        .map(|i| format_ident!("__l{}", i))
        .collect();
    // What the handle derefs to: the function itself (an async one boxed, so that its type
    // can be named).
    let (local_ty, local_fn) = if sig.asyncness.is_some() {
        // A method's future borrows the value: it lives as long as the one reference in.
        let borrow = receiver.as_ref().map(|_| quote!(+ '_));
        let fut = quote!(::core::pin::Pin<::std::boxed::Box<dyn ::core::future::Future<Output = #ret_ty> + ::core::marker::Send #borrow>>);
        (
            quote!(fn(#(#all_types),*) -> #fut),
            quote! {
                #[doc(hidden)]
                #[allow(non_snake_case, clippy::needless_pass_by_value)]
                fn #local_ident(#(#all_idents: #all_types),*) -> #fut {
                    ::std::boxed::Box::pin(#impl_ident(#(#all_idents),*))
                }
            },
        )
    } else {
        (quote!(fn(#(#all_types),*) -> #ret_ty), quote!())
    };
    let local_value = if sig.asyncness.is_some() {
        quote!(#local_ident as #local_ty)
    } else {
        quote!(#impl_ident as #local_ty)
    };
    // An async method's task owns the value (an `Arc`) and lends it to the method.
    let this = match (&receiver, sig.asyncness.is_some()) {
        (Some(_), true) => Some(quote!(&*__this,)),
        (Some(_), false) => Some(quote!(__this,)),
        (None, _) => None,
    };
    let call = if sig.asyncness.is_some() {
        quote!(#impl_ident(#this #(#idents),*).await)
    } else {
        quote!(#impl_ident(#this #(#idents),*))
    };
    let wrapped = if fallible {
        call
    } else {
        quote!(::core::result::Result::<_, ::core::convert::Infallible>::Ok(#call))
    };
    // How to keep the result: by autoref specialization on the concrete type, sent if it is
    // `Serialize`, kept on the owner only otherwise.
    let keep = quote! {{
        #[allow(unused_imports)]
        use ::distrpc::__private::{KeepOpaque as _, KeepSerialized as _};
        (&&::distrpc::__private::Keeper::<#ok_ty>::new()).keeper()
    }};
    let (handle_ty, handler) = match (&receiver, sig.asyncness.is_some()) {
        (Some(t), true) => (
            quote!(::distrpc::Method<#t, #args_ty, #ok_ty, #local_ty>),
            quote! {
                ::distrpc::__private::async_method_handler::<#t, #args_ty, _, _, _, _>(
                    #name,
                    |__this: ::std::sync::Arc<#t>, (#(#idents,)*): #args_ty| async move { #wrapped },
                    #keep,
                )
            },
        ),
        (Some(t), false) => (
            quote!(::distrpc::Method<#t, #args_ty, #ok_ty, #local_ty>),
            quote! {
                ::distrpc::__private::method_handler::<#t, #args_ty, _, _, _>(
                    #name,
                    |__this: &#t, (#(#idents,)*): #args_ty| #wrapped,
                    #keep,
                )
            },
        ),
        (None, true) => (
            quote!(::distrpc::Function<#args_ty, #ok_ty, #local_ty>),
            quote! {
                ::distrpc::__private::async_handler::<#args_ty, _, _, _, _>(
                    #name,
                    |(#(#idents,)*): #args_ty| async move { #wrapped },
                    #keep,
                )
            },
        ),
        (None, false) => (
            quote!(::distrpc::Function<#args_ty, #ok_ty, #local_ty>),
            quote! {
                ::distrpc::__private::sync_handler::<#args_ty, _, _, _>(
                    #name,
                    |(#(#idents,)*): #args_ty| #wrapped,
                    #keep,
                )
            },
        ),
    };
    let handler = if args.inline.is_some() {
        quote!(#handler.inline())
    } else {
        handler
    };
    let mut inner = func.clone();
    inner.sig.ident = impl_ident.clone();
    inner.attrs.retain(|a| !a.path().is_ident("doc"));
    let const_doc = format!(
        "Remote handle of `{ident}`; call it with `Rpc::rpc_sync` / `rpc_async`, or locally as `{ident}(..)`."
    );
    let span = Span::call_site();
    Ok(quote::quote_spanned! {span=>
        #(#docs)*
        #[doc = ""]
        #[doc = #const_doc]
        #[allow(non_upper_case_globals)]
        #vis const #ident: #handle_ty = <#handle_ty>::with_local(#name, #local_value);

        #[doc(hidden)]
        #[allow(non_snake_case, clippy::needless_pass_by_value)]
        #inner

        #local_fn

        ::distrpc::__private::inventory::submit! {
            ::distrpc::__private::Registration {
                name: #name,
                origin: concat!(module_path!(), "::", stringify!(#ident)),
                handler: || #handler,
            }
        }
    })
}
