//! ISO 9660 (ECMA-119), Rock Ridge (IEEE P1282), El Torito.
