"""`ecomla export`: an ecomla checkpoint in a format stock engines load (export.py)."""
