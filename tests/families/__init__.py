"""Model families: image models and text-to-image pipelines."""
