"""The pool's decisions as pure functions: state projected from the log (and what was observed) in, a
decision out. No Ray calls, no I/O, no event loop; each is table-tested without a browser or Ray."""
