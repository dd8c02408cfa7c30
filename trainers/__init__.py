"""Reference trainers that produce the models qpack compresses. They import qpack; qpack never imports them."""
