"""The llmc compiler: frontend → IR → passes → codegen (installed as ``llmc.compiler``)."""
