"""The test suite; its folders mirror the package: unit/, engine/, families/, e2e/, distributed/, gpu/, and helpers/."""
