"""methods/mend"""
