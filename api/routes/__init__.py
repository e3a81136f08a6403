"""The API's routes, one module per concern; :func:`beliefstore.api.app.create_app`
includes them."""
