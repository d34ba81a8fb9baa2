"""Pure types, configs, errors, acceptance and sampling math, draft policies, the wire codec and
prompt handling: no model, no network. Imports nothing else of `common`."""
