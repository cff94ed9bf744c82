//! Sans-IO HTTP/1.1: the request decoder (framing, limits, chunked bodies,
//! `Expect: 100-continue`) and the response encoder. Nothing here touches a
//! socket: engines feed received bytes into an [`InBuf`], call
//! [`Decoder::decode`], and write the bytes that [`Response::encode`] produces.

mod decoder;
mod request;
mod response;

pub use decoder::{Decoded, Decoder, HttpError, InBuf, Limits};
pub use request::{Method, Request};
pub use response::{reason_phrase, Response, CONTINUE_100};
