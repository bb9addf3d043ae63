"""The `minicpm` command: argument parsing (`main`, `options`), the verbs (`verbs`) and the
interactive chat loop (`repl`). Nothing in the package imports it."""
