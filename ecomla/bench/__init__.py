"""`ecomla bench`: decode speed and memory of an MLA model vs its GQA source (`ecomla.bench.run.bench`)."""
