"""The model side: loading (`loading`), the drafter/verifier split with its exit head and adapter
I/O (`split`), the draft vocabulary, warm starts (`warm_start`, shipped ones in `warmstarts/`), and
the fast CPU forward (`engine`). Imports `common.core` only."""
