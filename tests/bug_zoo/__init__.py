"""Hand-written layers, each with one classic backward mistake, next to a correct twin.

Every file stands alone (numpy or torch only, no relative imports) so that it can be given
to ``gradtool check SPEC --impl tests/bug_zoo/FILE.py:NAME`` as well as imported by the tests.
"""
