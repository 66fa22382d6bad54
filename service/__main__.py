"""`python -m service --bundle PATH`: serve a bundle (same as `letterrec serve`)."""

from service.server import main

main()
